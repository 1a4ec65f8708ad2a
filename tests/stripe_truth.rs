//! What paystream writes for what Stripe says, through the real daemon in embedded mode (real
//! Postgres, the emulator behaving as Stripe does where paystream depends on it): money is
//! checked in the currency's minor unit before `succeeded` is written (zero- and three-decimal
//! currencies, another currency, a partial capture); a double charge found by Search is
//! flagged; Search's lag only delays; a 429 storm lowers the rate and loses nothing. The
//! decline-then-retry and cancel cases are in tests/pipeline.rs (Kafka mode),
//! tests/embedded.rs and tests/feed.rs.

mod common;

use std::collections::BTreeMap;

use common::embedded::*;
use common::*;

/// The daemon's world with a Stripe key of its own, so the emulator's per-key settings and log
/// are this test's alone.
async fn world(prefix: &str) -> (Env, String) {
    let env = env(prefix, false).await;
    let key = format!("sk_test_{}", env.n.slot);
    (env, key)
}

/// Starts the daemon on the test's world with its own key and `extra` flags; returns its admin
/// port and the process.
fn start(t: &Env, key: &str, extra: &[&str]) -> (u16, Proc) {
    let port = free_port();
    let mut flags = vec!["--stripe-key", key];
    flags.extend_from_slice(extra);
    let run = spawn(
        &embedded_args(t.s, &t.n, t.dir.path(), port, &flags),
        &t.logs.join("run.log"),
    );
    (port, run)
}

fn flagged(port: u16) -> Vec<serde_json::Value> {
    let (code, body) = http_get(port, "/state/list?flagged=true").unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn succeeded_is_written_only_when_the_money_matches_the_row() {
    let (t, key) = world("money").await;
    let (s, db, n, logs) = (t.s, &t.db, &t.n, &t.logs);
    let base = &s.stripe;
    let (jpy, st) = intent(
        base,
        &Intent {
            amount: "500",
            currency: "jpy",
            ..Intent::default()
        },
    );
    assert_eq!(st, "succeeded");
    let (kwd, _) = intent(
        base,
        &Intent {
            amount: "5120",
            currency: "kwd",
            ..Intent::default()
        },
    );
    let (eur, _) = intent(
        base,
        &Intent {
            amount: "1250",
            currency: "eur",
            ..Intent::default()
        },
    );
    let manual = Intent {
        amount: "1000",
        manual_capture: true,
        ..Intent::default()
    };
    let (partial, st) = intent(base, &manual);
    assert_eq!(st, "requires_capture");
    let (full, _) = intent(base, &manual);
    let (uncaptured, _) = intent(base, &manual);
    let rows = [
        ("jpy", "500", "jpy", &jpy),
        ("kwd", "5.120", "KWD", &kwd),
        ("eur", "12.50", "usd", &eur),
        ("partial", "10.00", "usd", &partial),
        ("full", "10.00", "usd", &full),
        ("uncaptured", "10.00", "usd", &uncaptured),
    ];
    let mut ids = BTreeMap::new();
    for (name, amount, currency, pi) in rows {
        ids.insert(
            name,
            insert_in(db, &n.table, name, amount, currency, Some(pi)).await,
        );
    }
    let (port, mut run) = start(&t, &key, &[]);
    // Captured after paystream saw them authorized: 600 of 1,000, and all of it.
    wait_for("the authorizations polled", 30, || async {
        metric(
            port,
            "paystream_polls_total",
            &["outcome=\"still_pending\""],
        ) >= 3.0
    })
    .await;
    stripe_post(
        base,
        &format!("/v1/payment_intents/{partial}/capture"),
        &[("amount_to_capture", "600")],
    );
    stripe_post(base, &format!("/v1/payment_intents/{full}/capture"), &[]);
    wait_for("the matching payments written", 30, || async {
        let mut ok = true;
        for name in ["jpy", "kwd", "full"] {
            ok &= status(db, &n.table, ids[name]).await == "succeeded";
        }
        ok && flagged(port).len() == 2
    })
    .await;
    for name in ["eur", "partial", "uncaptured"] {
        assert_eq!(status(db, &n.table, ids[name]).await, "pending", "{name}");
    }
    let mut kinds: Vec<(String, String)> = flagged(port)
        .iter()
        .map(|p| {
            (
                p["idempotency_key"].as_str().unwrap().to_string(),
                p["flag"]["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            ("eur".to_string(), "amount_mismatch".to_string()),
            ("partial".to_string(), "amount_mismatch".to_string()),
        ]
    );
    assert_eq!(
        metric(
            port,
            "paystream_mismatches_total",
            &["kind=\"amount_mismatch\""]
        ),
        2.0,
        "each flagged once: the next ask is a stale interval away"
    );
    let log = std::fs::read_to_string(logs.join("run.log")).unwrap();
    assert!(
        log.contains("Stripe received 600 usd, row 10.00 usd = 1000"),
        "the warning names both sides"
    );
    t.finish(&mut run).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn search_finds_late_never_fails_and_flags_a_double_charge() {
    let (t, key) = world("search").await;
    let (s, db, n) = (t.s, &t.db, &t.n);
    let base = &s.stripe;
    // Search does not see an intent until 3 s after it was created.
    emulator_post(
        base,
        "/_paystream/config",
        &serde_json::json!({"key": key, "search_lag_ms": 3000}),
    );
    let late = format!("{}-late", n.slot);
    let twice = format!("{}-twice", n.slot);
    let gone = format!("{}-gone", n.slot);
    let (found_later, _) = intent(
        base,
        &Intent {
            key: Some(&late),
            ..Intent::default()
        },
    );
    for _ in 0..2 {
        intent(
            base,
            &Intent {
                key: Some(&twice),
                ..Intent::default()
            },
        );
    }
    // A canceled intent found by Search is no failure: a newer one may not be indexed yet.
    let canceled = stripe_post(
        base,
        "/v1/payment_intents",
        &[
            ("amount", "1000"),
            ("currency", "usd"),
            ("metadata[idempotency_key]", &gone),
        ],
    );
    stripe_post(
        base,
        &format!(
            "/v1/payment_intents/{}/cancel",
            canceled["id"].as_str().unwrap()
        ),
        &[],
    );
    let a = insert(db, &n.table, &late, "10.00", None).await;
    let b = insert(db, &n.table, &twice, "10.00", None).await;
    let c = insert(db, &n.table, &gone, "10.00", None).await;
    let (port, mut run) = start(&t, &key, &["--retry-backoff", "300ms"]);
    wait_for("the late intent found and written", 30, || async {
        status(db, &n.table, a).await == "succeeded"
    })
    .await;
    assert!(
        metric(port, "paystream_polls_total", &["outcome=\"not_found\""]) >= 1.0,
        "Search missed it first"
    );
    // The writer filled in the intent Search found, as the updater does.
    let row = db
        .query_one(
            &format!(
                "SELECT stripe_payment_intent_id FROM {} WHERE id = $1",
                n.table
            ),
            &[&a],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), Some(found_later));
    wait_for("the double charge flagged", 30, || async {
        flagged(port)
            .iter()
            .any(|p| p["flag"]["kind"] == "double_charge")
    })
    .await;
    let polls_of_c = || async {
        let (_, body) = http_get(port, &format!("/state/get?q={c}")).unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()[0]["polls"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_for("the canceled hit polled twice", 30, || async {
        polls_of_c().await >= 2
    })
    .await;
    for id in [b, c] {
        assert_eq!(status(db, &n.table, id).await, "pending");
    }
    t.finish(&mut run).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_storm_lowers_the_rate_and_loses_nothing() {
    let (t, key) = world("storm").await;
    let (s, db, n) = (t.s, &t.db, &t.n);
    let base = &s.stripe;
    let intents = bulk_intents(base, 30, "4242424242424242", &format!("{}-", n.slot));
    confirm(base, &intents);
    let mut ids = Vec::new();
    for (i, pi) in intents.iter().enumerate() {
        ids.push(insert(db, &n.table, &format!("storm-{i}"), "10.00", Some(pi)).await);
    }
    // Stripe lets this key through at 3 requests a second; paystream starts at 10.
    emulator_post(
        base,
        "/_paystream/config",
        &serde_json::json!({"key": key, "rate_limit_rps": 3}),
    );
    let (port, mut run) = start(
        &t,
        &key,
        &["--stripe-rps", "10", "--retry-backoff", "500ms"],
    );
    let mut lowest = f64::MAX;
    let (ids_ref, table) = (&ids, &n.table);
    wait_for("every payment written", 90, || {
        let rate = sample(&scrape(port), "paystream_stripe_rate_limit", &[]);
        if rate > 0.0 {
            lowest = lowest.min(rate);
        }
        async move {
            let mut done = 0;
            for id in ids_ref {
                done += usize::from(status(db, table, *id).await == "succeeded");
            }
            done == ids_ref.len()
        }
    })
    .await;
    assert!(
        metric(port, "paystream_polls_total", &["outcome=\"rate_limited\""]) >= 1.0,
        "Stripe refused some"
    );
    assert!(
        lowest <= 5.0,
        "the rate was halved at least once: lowest {lowest}"
    );
    // Each row written once (the writer is forward-only; a 429 resolved nothing).
    assert_eq!(
        metric(
            port,
            "paystream_updater_rows_total",
            &["result=\"updated\""]
        ),
        ids.len() as f64
    );
    emulator_post(
        base,
        "/_paystream/config",
        &serde_json::json!({"key": key, "rate_limit_rps": null}),
    );
    t.finish(&mut run).await;
}

/// Stripe Connect: with `--account-column`, each payment is looked up in its row's connected
/// account (`Stripe-Account`); a row without one uses `--stripe-account`. The emulator scopes
/// intents by account as Stripe does, so an intent asked for in the wrong account is a 404:
/// the platform's intent of a row that falls back to `--stripe-account` is never found.
#[tokio::test(flavor = "multi_thread")]
async fn connect_accounts_scope_every_lookup() {
    let (t, key) = world("connect").await;
    let (s, db, n) = (t.s, &t.db, &t.n);
    let base = &s.stripe;
    db.batch_execute(&format!("ALTER TABLE {} ADD COLUMN account text", n.table))
        .await
        .unwrap();
    let in_account = |account| {
        intent(
            base,
            &Intent {
                account,
                ..Intent::default()
            },
        )
        .0
    };
    let (pi_a, pi_b, pi_platform) = (
        in_account(Some("acct_A1")),
        in_account(Some("acct_B2")),
        in_account(None),
    );
    let row = |key: &'static str, pi: String, account: Option<&'static str>| async move {
        let id = insert(db, &n.table, key, "10.00", Some(&pi)).await;
        db.execute(
            &format!("UPDATE {} SET account = $2 WHERE id = $1", n.table),
            &[&id, &account],
        )
        .await
        .unwrap();
        id
    };
    let (pi_waiting, st) = intent(
        base,
        &Intent {
            card: "4000002760003184",
            account: Some("acct_A1"),
            ..Intent::default()
        },
    );
    assert_eq!(st, "requires_action");
    let a = row("a", pi_a, Some("acct_A1")).await;
    let w = row("w", pi_waiting, Some("acct_A1")).await;
    let b = row("b", pi_b, None).await;
    let p = row("p", pi_platform, None).await;
    let (port, mut run) = start(
        &t,
        &key,
        &["--stripe-account", "acct_B2", "--account-column", "account"],
    );
    wait_for("both connected accounts' payments written", 30, || async {
        status(db, &n.table, a).await == "succeeded" && status(db, &n.table, b).await == "succeeded"
    })
    .await;
    wait_for("the platform's intent not found in acct_B2", 30, || async {
        metric(port, "paystream_polls_total", &["outcome=\"not_found\""]) >= 1.0
    })
    .await;
    assert_eq!(status(db, &n.table, p).await, "pending");
    // State keeps each row's account: the one still waiting is polled in acct_A1.
    wait_for("the waiting payment polled in its account", 30, || async {
        let (_, body) = http_get(port, &format!("/state/get?q={w}")).unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()[0]["last_outcome"]
            == "still_pending"
    })
    .await;
    let (_, body) = http_get(port, "/state/export").unwrap();
    assert!(
        body.lines().any(
            |l| l.contains(&format!("\"id\":\"{w}\"")) && l.contains("\"account\":\"acct_A1\"")
        ),
        "{body}"
    );
    t.finish(&mut run).await;
}
