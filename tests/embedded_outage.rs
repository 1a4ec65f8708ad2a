//! Embedded mode rides out a Postgres restart: the replication session ends, paystream reports
//! not ready, reconnects with backoff and resumes where state is, and payments inserted while
//! it was away and after it came back resolve. Nothing held is lost.
//!
//! This binary restarts the shared dev Postgres, so it holds one test only.

mod common;

use std::collections::BTreeMap;

use common::embedded::*;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_is_ridden_out() {
    let t = env("emboutage", false).await;
    let (s, db, n, dir, logs) = (t.s, &t.db, &t.n, &t.dir, &t.logs);
    let held = insert(db, &n.table, "held", "5.00", None).await;
    let port = free_port();
    let mut run = spawn(
        &embedded_args(s, n, dir.path(), port, &[]),
        &logs.join("run.log"),
    );
    wait_for("ready", 30, || async {
        http_get(port, "/readyz").map(|r| r.0) == Some(200)
    })
    .await;
    let (ok, _) = intent_with_card(&s.stripe, "2500", "4242424242424242");
    let before = insert(db, &n.table, "before", "25.00", Some(&ok)).await;
    wait_for("the first payment resolved", 30, || async {
        status(db, &n.table, before).await == "succeeded"
    })
    .await;

    script("pg-down");
    wait_for("not ready while Postgres is down", 30, || async {
        http_get(port, "/readyz").map(|r| r.0) == Some(503)
    })
    .await;
    assert_eq!(metric(port, "paystream_replication_connected", &[]), 0.0);
    script("pg-up");

    let db = pg(&s.pg_url).await;
    let (ok2, _) = intent_with_card(&s.stripe, "3100", "4242424242424242");
    let after = insert(&db, &n.table, "after", "31.00", Some(&ok2)).await;
    wait_for(
        "the payment inserted after the restart resolved",
        60,
        || async { status(&db, &n.table, after).await == "succeeded" },
    )
    .await;
    assert!(metric(port, "paystream_replication_reconnects_total", &[]) >= 1.0);
    let want: BTreeMap<String, String> = [(held.to_string(), "5.00".to_string())].into();
    wait_for("state holds the pending row", 30, || async {
        state_amounts(port).as_ref() == Some(&want)
    })
    .await;
    let lsn = current_lsn(&db).await;
    wait_confirmed(&db, &n.slot, &lsn, 30).await;
    t.finish(&mut run).await;
}
