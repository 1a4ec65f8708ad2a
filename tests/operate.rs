//! What an operator sees, on real servers: the metrics move by exactly what happened, the
//! monitoring files name only metrics that exist, JSON logs carry each payment's ids and no
//! secret, and every `paystream state` command answers the same from a running daemon as from
//! its stopped data dir.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;

const STRIPE_KEY: &str = "sk_test_paystream";

/// Runs `paystream state <args…>`: (exit code, stdout, stderr).
fn state_cli(data: &Path, port: u16, args: &[&str]) -> (i32, String, String) {
    output(
        Command::new(env!("CARGO_BIN_EXE_paystream"))
            .arg("state")
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(args)
            .env_remove("RUST_LOG"),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Metric names a monitoring file uses, as exposed (a histogram's `_bucket`, `_sum` and `_count`
/// are its own name).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("paystream_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
                .unwrap_or(text.len() - start);
        // Skip names inside a longer word (a job label "paystream-updater" has no underscore).
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            let n = &text[start..end];
            let n = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n);
            names.insert(n.to_string());
        }
        i = end;
    }
    names
}

/// Waits up to 60 s for a scrape of `port` to satisfy `ok`; on timeout shows the last scrape.
async fn settle(what: &str, port: u16, ok: impl Fn(&str) -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let m = scrape(port);
        if ok(&m) {
            return;
        }
        if std::time::Instant::now() > end {
            let shown: Vec<&str> = m.lines().filter(|l| !l.starts_with('#')).collect();
            panic!(
                "timed out waiting for {what}; last scrape:\n{}",
                shown.join("\n")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_logs_carry_payment_ids() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "ops", 2).await;
    let logs = log_dir(&t.run);
    let (pi_ok, _) = intent_with_card(&s.stripe, "4999", "4242424242424242");
    let pi_canceled = intent_canceled(&s.stripe, "1500");
    let (pi_3ds, _) = intent_with_card(&s.stripe, "2500", "4000002760003184");
    let run = &t.run;
    let ok = insert_payment(&db, &t.table, &format!("{run}-ok"), "49.99", Some(&pi_ok)).await;
    let canceled = insert_payment(
        &db,
        &t.table,
        &format!("{run}-canceled"),
        "15.00",
        Some(&pi_canceled),
    )
    .await;
    let three_ds =
        insert_payment(&db, &t.table, &format!("{run}-3ds"), "25.00", Some(&pi_3ds)).await;

    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut args = vec!["--log-format".to_string(), "json".to_string()];
    args.extend(run_args(
        s,
        &t,
        data.path(),
        port,
        &["--state-stats-interval", "1s"],
    ));
    let mut daemon = spawn(&args, &logs.join("run.log"));
    let up_port = free_port();
    let mut up_args = vec!["--log-format".to_string(), "json".to_string()];
    up_args.extend(table_updater_args(
        s,
        &t,
        &["--metrics-addr", &format!("127.0.0.1:{up_port}")],
    ));
    let mut updater = spawn(&up_args, &logs.join("updater.log"));
    wait_for("both admin endpoints", 60, || async {
        http_get(port, "/healthz").is_some() && http_get(up_port, "/healthz").is_some()
    })
    .await;
    // Series known in advance exist at 0 before anything happened.
    let before = scrape(port);
    assert_eq!(
        sample(
            &before,
            "paystream_polls_total",
            &["outcome=\"server_error\""]
        ),
        0.0,
        "{before}"
    );
    assert!(before.contains("paystream_dlq_messages_total{reason=\"bad_value\"} 0"));

    // Debezium's three creates, and one poison message (by hand: Debezium never writes one).
    let p = producer(&s.brokers);
    publish(&p, &t.cdc, Some(&cdc_key(1)), Some(b"{not json")).await;

    wait_for("two statuses written to Postgres", 60, || async {
        read_payment(&db, &t.table, ok.id).await.status != "pending"
            && read_payment(&db, &t.table, canceled.id).await.status != "pending"
    })
    .await;
    // Debezium streams the updater's writes back: the two leave state.
    // Replays the updater must skip: a duplicate of a written status, and an unknown row.
    publish(
        &p,
        &t.status,
        Some(ok.id.to_string().as_bytes()),
        Some(&status_event(ok.id, "succeeded")),
    )
    .await;
    publish(
        &p,
        &t.status,
        Some(b"999999999"),
        Some(&status_event(999_999_999, "failed")),
    )
    .await;

    settle("the daemon's gauges", port, |m| {
        sample(m, "paystream_cdc_events_total", &["op=\"u\""]) >= 2.0
            && sample(m, "paystream_pending_payments", &[]) == 1.0
            && sample(m, "paystream_awaiting_confirmation_payments", &[]) == 0.0
            && sample(m, "paystream_consumer_lag", &[]) == 0.0
            && sample(m, "paystream_stored_offset", &[]) == 6.0
            && sample(m, "paystream_polls_total", &["still_pending"]) >= 2.0
    })
    .await;
    settle("the updater's counts", up_port, |m| {
        sample(m, "paystream_updater_rows_total", &[]) >= 4.0
    })
    .await;

    let m = scrape(port);
    let v = |name: &str, parts: &[&str]| sample(&m, name, parts);
    // CDC in, by op and outcome.
    assert_eq!(
        v("paystream_cdc_events_total", &["op=\"c\"", "tracked"]),
        3.0
    );
    assert_eq!(
        v("paystream_cdc_events_total", &["op=\"u\"", "removed"]),
        2.0
    );
    assert_eq!(v("paystream_cdc_events_total", &["dead_lettered"]), 1.0);
    assert_eq!(v("paystream_cdc_events_total", &[]), 6.0, "{m}");
    assert_eq!(v("paystream_dlq_messages_total", &["invalid_json"]), 1.0);
    assert_eq!(v("paystream_dlq_messages_total", &[]), 1.0);
    // Polls: one final answer each, the 3DS one still pending, no errors.
    assert_eq!(v("paystream_polls_total", &["outcome=\"succeeded\""]), 1.0);
    assert_eq!(v("paystream_polls_total", &["outcome=\"failed\""]), 1.0);
    let polls = v("paystream_polls_total", &[]);
    assert_eq!(
        polls,
        2.0 + v("paystream_polls_total", &["still_pending"]),
        "{m}"
    );
    // One latency sample per Stripe request. The sample is taken just before the outcome is
    // counted, so a scrape between the two can see one more sample than outcomes.
    let latencies = v("paystream_stripe_request_duration_seconds_count", &[]);
    assert!(
        latencies == polls || latencies == polls + 1.0,
        "{latencies} latency samples for {polls} polls"
    );
    assert_eq!(v("paystream_status_events_total", &["succeeded"]), 1.0);
    assert_eq!(v("paystream_status_events_total", &["failed"]), 1.0);
    // State gauges: the 3DS payment, young, at most one poll due.
    assert_eq!(
        v("paystream_pending_payments_by_age", &["age=\"<10m\""]),
        1.0
    );
    assert_eq!(v("paystream_pending_payments_by_age", &[]), 1.0);
    assert!(v("paystream_polls_due", &[]) <= 1.0);
    let oldest = v("paystream_oldest_pending_age_seconds", &[]);
    assert!(oldest > 0.0 && oldest < 600.0, "{oldest}");
    // Checkpoints, partitions, brokers.
    assert!(v("paystream_checkpoint_duration_seconds_count", &[]) >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last_cp = v("paystream_last_checkpoint_timestamp_seconds", &[]);
    assert!(
        (now - last_cp).abs() < 10.0,
        "last checkpoint {last_cp}, now {now}"
    );
    assert_eq!(v("paystream_partitions_assigned", &[]), 2.0);
    assert!(v("paystream_kafka_brokers_up", &[]) >= 1.0);

    let u = scrape(up_port);
    assert_eq!(
        sample(&u, "paystream_updater_rows_total", &["updated"]),
        2.0
    );
    assert_eq!(
        sample(&u, "paystream_updater_rows_total", &["already_final"]),
        1.0
    );
    assert_eq!(
        sample(&u, "paystream_updater_rows_total", &["unknown_id"]),
        1.0
    );
    assert!(sample(&u, "paystream_updater_batch_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        sample(&u, "paystream_updater_postgres_errors_total", &[]),
        0.0
    );

    // Every metric the dashboard and the alert rules use is one these processes expose.
    let exposed = format!("{m}\n{u}");
    for file in ["grafana-dashboard.json", "alerts.yml"] {
        let text = std::fs::read_to_string(root().join("scripts/monitoring").join(file)).unwrap();
        let names = metric_names(&text);
        assert!(names.len() >= 8, "{file}: {names:?}");
        for n in names {
            assert!(
                exposed
                    .lines()
                    .any(|l| l.starts_with(&n) && !l.starts_with('#')),
                "{file} uses {n}, which neither process exposes"
            );
        }
    }

    // `state get` by intent id, live: the poll history of the 3DS payment.
    let (code, out, err) = state_cli(data.path(), port, &["get", &pi_3ds, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("from the running daemon"), "{err}");
    let g = json(&out);
    assert_eq!(g["id"], three_ds.id.to_string());
    assert_eq!(g["state"], "pending");
    let last = g["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"], "still_pending");
    assert_eq!(last["stripe_status"], "requires_action");
    assert_eq!(g["last_cdc"]["op"], "c");
    // 25.00 as Debezium streams an unconstrained NUMERIC (trailing zeros dropped).
    assert_eq!(g["last_cdc"]["row"]["amount"], "25");

    assert!(daemon.term().success());
    assert!(updater.term().success());

    // Logs: JSON lines; each about a payment names its id, key and intent; no secret anywhere.
    let mut about_payments = 0;
    for f in ["run.log", "updater.log"] {
        let text = std::fs::read_to_string(logs.join(f)).unwrap();
        assert!(!text.contains(STRIPE_KEY), "{f} shows the Stripe key");
        for line in text.lines() {
            let l = json(line);
            let Some(id) = l.get("payment_id").and_then(|v| v.as_str()) else {
                continue;
            };
            about_payments += 1;
            assert!(
                l["idempotency_key"].is_string() && l["intent_id"].is_string(),
                "{f}: a line about payment {id} lacks its ids: {line}"
            );
        }
    }
    // At least: 3 creates, 2 emitted, 4 applied or skipped by the updater, 3DS polls.
    assert!(
        about_payments >= 8,
        "{about_payments} log lines about payments"
    );
    assert_no_panic(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_commands_answer_the_same_live_and_stopped() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "inspect", 2).await;
    let logs = log_dir(&t.run);
    let mut rows = Vec::new();
    for i in 0..5 {
        let key = format!("{}-{i}", t.run);
        rows.push(
            insert_payment(
                &db,
                &t.table,
                &key,
                &format!("{i}0.05"),
                Some(&format!("pi_{key}")),
            )
            .await,
        );
    }
    // A still-pending update of one row: its last CDC event becomes a `u`.
    cdc_update(&db, &t, &rows[3]).await;

    // An hour between polls: nothing changes state while the commands run.
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut daemon = spawn(
        &run_args(s, &t, data.path(), port, &["--poll-interval", "1h"]),
        &logs.join("run.log"),
    );
    wait_for("six CDC events checkpointed", 60, || async {
        sample(&scrape(port), "paystream_stored_offset", &[]) == 6.0
    })
    .await;

    let id = rows[3].id.to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["stats", "--format", "json"],
        vec!["list", "--format", "json"],
        vec![
            "list",
            "--status",
            "pending",
            "--older-than",
            "0s",
            "--limit",
            "2",
            "--format",
            "json",
        ],
        vec!["list", "--due", "--format", "json"],
        vec!["list", "--status", "awaiting-cdc", "--format", "json"],
        vec!["get", &id, "--format", "json"],
        vec!["get", &rows[3].idempotency_key, "--format", "json"],
        vec![
            "get",
            rows[3].intent.as_deref().unwrap(),
            "--format",
            "json",
        ],
        vec!["export"],
    ];
    let run_all = |mode: &str| -> Vec<String> {
        commands
            .iter()
            .map(|c| {
                let (code, out, err) = state_cli(data.path(), port, c);
                assert_eq!(code, 0, "state {c:?}: {err}");
                assert!(err.contains(mode), "state {c:?} should say {mode:?}: {err}");
                assert!(!err.contains("exported"), "progress on a pipe: {err}");
                out
            })
            .collect()
    };
    let live = run_all("from the running daemon");
    // Another process holds the store and no daemon serving it answers at this address.
    let (code, _, err) = state_cli(data.path(), free_port(), &["stats"]);
    assert_eq!(code, 1);
    assert!(err.contains("in use by another process"), "{err}");
    let (code, table, _) = state_cli(data.path(), port, &["list"]);
    assert_eq!(code, 0);
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(
        table.lines().count(),
        6,
        "header and five payments:\n{table}"
    );

    assert!(daemon.term().success());
    let stopped = run_all("offline from");

    // Same answers, but for what depends on the moment of asking.
    let mut a = json(&live[0]);
    let mut b = json(&stopped[0]);
    for st in [&mut a, &mut b] {
        let o = st.as_object_mut().unwrap();
        for k in [
            "at",
            "last_checkpoint",
            "last_checkpoint_age_seconds",
            "data_dir_bytes",
        ] {
            o.remove(k);
        }
        o["oldest_pending"]
            .as_object_mut()
            .unwrap()
            .remove("age_seconds");
    }
    assert_eq!(a, b, "stats");
    assert_eq!(a["pending"], 5);
    assert_eq!(a["awaiting_cdc"], 0);
    assert_eq!(a["due_now"], 0);
    let next: i64 = a["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["next_offset"].as_i64().unwrap())
        .sum();
    assert_eq!(next, 6);
    assert_eq!(
        a["data_dir"],
        std::fs::canonicalize(data.path())
            .unwrap()
            .to_str()
            .unwrap()
    );
    for (i, (l, s)) in live.iter().zip(&stopped).enumerate().skip(1) {
        assert_eq!(l, s, "state {:?}", commands[i]);
    }

    let all = json(&live[1]);
    assert_eq!(all.as_array().unwrap().len(), 5);
    let two = json(&live[2]);
    let two: Vec<&str> = two
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(two.len(), 2, "--limit 2");
    assert_eq!(
        json(&live[3]),
        serde_json::json!([]),
        "nothing due within the hour"
    );
    assert_eq!(json(&live[4]), serde_json::json!([]));
    for g in &live[5..8] {
        let g = json(g);
        assert_eq!(g["id"], id);
        assert_eq!(g["amount"], "30.05");
        assert_eq!(g["last_cdc"]["op"], "u");
        assert_eq!(g["history"], serde_json::json!([]));
        assert!(g["status_event"].is_null());
    }
    let exported: Vec<serde_json::Value> = live[8].lines().map(json).collect();
    assert_eq!(exported.len(), 5);
    let mut ids: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
    ids.sort();
    assert_eq!(
        exported
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        ids,
        "export in id order"
    );

    // Progress goes to stderr only when it is a terminal: not in the runs above (a pipe), but
    // under a pseudo-terminal (util-linux `script`), with stdout still the export.
    let cmd = format!(
        "{} state --data-dir {} export > {}",
        env!("CARGO_BIN_EXE_paystream"),
        data.path().display(),
        data.path().join("export.jsonl").display()
    );
    let tty = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    assert!(tty.status.success());
    assert!(
        String::from_utf8_lossy(&tty.stdout).contains("exported 5 entries"),
        "{tty:?}"
    );
    assert_eq!(
        std::fs::read_to_string(data.path().join("export.jsonl")).unwrap(),
        live[8]
    );

    // Not found: exit 1 and a reason.
    let (code, _, err) = state_cli(data.path(), port, &["get", "no-such-payment"]);
    assert_eq!(code, 1);
    assert!(err.contains("no payment matching"), "{err}");
    assert_no_panic(&logs);
}
