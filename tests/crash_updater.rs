//! `paystream updater` killed with SIGKILL mid-batch, again and again, on the real servers.
//!
//! Thousands of pending rows; status events for them are published at a steady pace while the
//! updater (batches of 20) is killed at random instants (`PAYSTREAM_CRASH_KILLS`, 20 here).
//! Each row gets a first status, some rows a later contradicting one, some events are replayed
//! in windows, and a few are unreadable or name unknown rows. After a final drain:
//! - every row has the status of its first event: writes only move forward, a contradicting
//!   or replayed event changed nothing;
//! - the audit trigger shows exactly one change per row, pending → that status;
//! - the group's committed offsets reach the end of the topic (nothing skipped, no stall).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn updater_killed_mid_batch_writes_each_row_once_forward_only() {
    let kills = knob("PAYSTREAM_CRASH_KILLS", 20) as usize;
    let rows = knob("PAYSTREAM_CRASH_ROWS", 4000) as i64;
    let seed = knob("PAYSTREAM_CRASH_SEED", rand::random::<u32>() as u64);
    eprintln!("updater crash test: kills={kills} rows={rows} seed={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let s = stack();
    let run = unique("upd");
    let topic = format!("{run}-status");
    let group = format!("{run}-updater");
    create_topics(&s.brokers, &[(&topic, 2)]).await;
    let logs = log_dir(&run);
    eprintln!("logs: {}", logs.display());

    let db = pg(&s.pg_url).await;
    install_status_audit(&db, "payments").await;
    let base: i64 =
        run.trim_start_matches("upd").parse::<i64>().unwrap() % 1_000_000 * 1_000_000 + 500_000;
    insert_pending_rows(&db, base, rows, "upd").await;
    // Each of these rows takes 5 ms to update, so a batch's transaction stays open long enough
    // for kills to land inside it (Postgres rolls those back; the replay re-applies them).
    db.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION slow_{run}() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(0.005); RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER slow_{run} BEFORE UPDATE ON payments FOR EACH ROW WHEN (OLD.id BETWEEN {base} AND {}) EXECUTE FUNCTION slow_{run}();",
        base + rows - 1
    ))
    .await
    .unwrap();
    let rollbacks = || async {
        count(
            &db,
            "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
    };
    let rollbacks_before = rollbacks().await;

    // The events: a first status per row, in random order; then contradicting events for some
    // rows, replayed windows, unknown rows and unreadable values mixed in.
    let mut order: Vec<i64> = (base..base + rows).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let mut first: HashMap<i64, &str> = HashMap::new();
    let mut events: Vec<(Option<i64>, Vec<u8>)> = Vec::new();
    let mut seen: Vec<i64> = Vec::new();
    for id in order {
        let st = if rng.gen_bool(0.5) {
            "succeeded"
        } else {
            "failed"
        };
        first.insert(id, st);
        events.push((Some(id), status_event(id, st)));
        seen.push(id);
        if rng.gen_bool(0.3) {
            // A later, contradicting answer for an earlier row (a bug upstream, or a
            // replay of another instance's decision): must change nothing.
            let old = seen[rng.gen_range(0..seen.len())];
            let other = if first[&old] == "succeeded" {
                "failed"
            } else {
                "succeeded"
            };
            events.push((Some(old), status_event(old, other)));
        }
        if rng.gen_bool(0.01) {
            let w = rng.gen_range(1..=50).min(events.len());
            let window = events[events.len() - w..].to_vec();
            events.extend(window);
        }
        if rng.gen_bool(0.002) {
            events.push((None, b"{\"not\":\"a status event\"".to_vec()));
        }
        if rng.gen_bool(0.002) {
            let ghost = base + rows + rng.gen_range(0..1000);
            events.push((Some(ghost), status_event(ghost, "succeeded")));
        }
    }
    eprintln!("{} status events for {rows} rows", events.len());

    // Published at a steady pace over most of the kill phase, so kills land mid-stream.
    let per_msg = Duration::from_secs_f64(kills as f64 * 5.0 / events.len() as f64);
    let p = Arc::new(producer(&s.brokers));
    let publisher = {
        let topic = topic.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            for (i, (key, value)) in events.iter().enumerate() {
                let key = key.map(|k| k.to_string().into_bytes());
                publish(&p, &topic, key.as_deref(), Some(value)).await;
                tokio::time::sleep_until((started + per_msg * (i as u32 + 1)).into()).await;
            }
        })
    };

    let args = updater_args(s, &topic, &group, &["--batch-size", "20"]);
    for k in 0..kills {
        let mut up = spawn(&args, &logs.join(format!("updater-{k}.log")));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..7000))).await;
        if let Some(st) = up.0.try_wait().unwrap() {
            panic!(
                "the updater exited by itself ({st}) before kill {k}:\n{}",
                std::fs::read_to_string(logs.join(format!("updater-{k}.log"))).unwrap()
            );
        }
        up.kill9();
    }
    let mut up = spawn(&args, &logs.join("updater-final.log"));
    publisher.await.unwrap();
    let high: i64 = high_watermarks(&s.brokers, &topic)
        .iter()
        .map(|(_, h)| h)
        .sum();
    wait_committed(
        s,
        &group,
        &topic,
        2,
        high,
        "the updater's commits to reach the end of the topic",
        180,
    )
    .await;
    assert!(up.term().success());
    assert_no_panic(&logs);
    db.batch_execute(&format!(
        "DROP TRIGGER slow_{run} ON payments; DROP FUNCTION slow_{run}();"
    ))
    .await
    .unwrap();
    let rolled_back = rollbacks().await - rollbacks_before;

    // Every row: its first status, changed exactly once.
    let now: BTreeMap<i64, String> = db
        .query(
            "SELECT id, status FROM payments WHERE id BETWEEN $1 AND $2",
            &[&base, &(base + rows - 1)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut wrong = Vec::new();
    for (id, st) in &now {
        if first[id] != st {
            wrong.push((*id, first[id], st.clone()));
        }
    }
    assert!(
        wrong.is_empty(),
        "rows not at their first status: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    let changes: Vec<(i64, i64)> = db
        .query(
            "SELECT id, count(*) FROM payments_changes WHERE id BETWEEN $1 AND $2 GROUP BY id HAVING count(*) <> 1 OR bool_or(old_status <> 'pending')",
            &[&base, &(base + rows - 1)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        changes.is_empty(),
        "rows changed more than once or not from pending: {changes:?}"
    );
    let changed: i64 = count(
        &db,
        "SELECT count(DISTINCT id) FROM payments_changes WHERE id BETWEEN $1 AND $2",
        &[&base, &(base + rows - 1)],
    )
    .await;
    assert_eq!(changed, rows, "every row changed once");

    eprintln!(
        "after {kills} kills: {rows} rows each changed once to their first status; {rolled_back} transactions rolled back by Postgres (kills inside an open batch transaction); {high} offsets committed"
    );
}
