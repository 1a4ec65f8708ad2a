//! Stripe faults never resolve a payment: 429s (with and without `Stripe-Should-Retry`), 5xx,
//! answers slower than the timeout, dropped connections, malformed bodies, unknown intents and
//! an unreachable API keep it pending; each is counted; the rate budget holds; backoff grows
//! with jitter; the payment resolves once Stripe answers again. Against the real emulator, with
//! faults injected by the project's wrapper (each test uses its own API key, so the wrapper's
//! per-key faults and request log never mix tests).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Sets the emulator's faults (429s, 5xx, slow answers) for the requests that follow.
fn inject(base: &str, faults: serde_json::Value) {
    emulator_post(base, "/_paystream/faults", &faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_errors_back_off_and_never_resolve() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "ft", 1).await;
    let (pi, st) = intent_with_card(&s.stripe, "700", "4242424242424242");
    assert_eq!(st, "succeeded");
    let row = insert_payment(
        &db,
        &t.table,
        &format!("{}-faulty", t.run),
        "7.00",
        Some(&pi),
    )
    .await;

    // The next five lookups of this intent fail: two 429s, two 503s, one answer slower than
    // the 500 ms timeout.
    let path = format!("/v1/payment_intents/{pi}");
    inject(
        &s.stripe,
        serde_json::json!([
            {"status": 429, "count": 2, "path": path},
            {"status": 503, "count": 2, "path": path},
            {"delay_ms": 1500, "count": 1, "path": path}
        ]),
    );

    let data = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = run_args(
        s,
        &t,
        data.path(),
        port,
        &["--retry-backoff", "200ms", "--stripe-timeout", "500ms"],
    );
    let mut daemon = spawn(&args, &logs.path().join("run.log"));

    let end = Instant::now() + Duration::from_secs(90);
    while metric(port, "paystream_status_events_total", &[]) < 1.0 {
        // While faults last, nothing may have resolved.
        let errors = metric(port, "paystream_polls_total", &["rate_limited"])
            + metric(port, "paystream_polls_total", &["server_error"])
            + metric(port, "paystream_polls_total", &["timeout"]);
        if errors < 5.0 {
            assert_eq!(
                metric(port, "paystream_polls_total", &["succeeded"]),
                0.0,
                "resolved during faults"
            );
        }
        assert!(
            Instant::now() < end,
            "never resolved; log: {}",
            std::fs::read_to_string(logs.path().join("run.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(port, "paystream_polls_total", &["rate_limited"]),
        2.0
    );
    assert_eq!(
        metric(port, "paystream_polls_total", &["server_error"]),
        2.0
    );
    assert_eq!(metric(port, "paystream_polls_total", &["timeout"]), 1.0);
    assert_eq!(metric(port, "paystream_polls_total", &["succeeded"]), 1.0);
    assert!(daemon.term().success());

    let events = read_all(&s.brokers, &t.status);
    assert_eq!(events.len(), 1, "one status event, after the faults");
    let ev: serde_json::Value = serde_json::from_slice(events[0].1.as_ref().unwrap()).unwrap();
    assert_eq!(
        (ev["status"].as_str(), ev["payment_id"].as_str()),
        (Some("succeeded"), Some(row.id.to_string().as_str()))
    );
    let store = paystream::state::Store::open(data.path()).unwrap();
    let e = store
        .get(&row.id.to_string())
        .unwrap()
        .expect("still in state until CDC confirms");
    assert_eq!(e.polls, 6, "five unanswered polls, then the answer: {e:?}");
    assert!(e.emitted.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_faults_resolves_nothing_keeps_the_rate_and_backs_off() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "storm", 1).await;
    let key = format!("sk_test_{}", t.run);
    let logs = log_dir(&t.run);

    // Four payments Stripe will say succeeded; one unknown intent; one row without an intent
    // whose search finds nothing.
    let mut rows = Vec::new();
    for i in 0..4 {
        let (pi, st) = intent_with_card(&s.stripe, &(800 + i).to_string(), "4242424242424242");
        assert_eq!(st, "succeeded");
        // The row says what the intent charged (8.00 to 8.03): paystream checks it.
        let amount = format!("8.{i:02}");
        rows.push(
            insert_payment(
                &db,
                &t.table,
                &format!("{}-ok-{i}", t.run),
                &amount,
                Some(&pi),
            )
            .await,
        );
    }
    let unknown_pi = format!("pi_unknown{}", t.run);
    let unknown = insert_payment(
        &db,
        &t.table,
        &format!("{}-unknown", t.run),
        "9.00",
        Some(&unknown_pi),
    )
    .await;
    let unsearchable =
        insert_payment(&db, &t.table, &format!("{}-nosuch", t.run), "9.50", None).await;

    // The next 27 requests with this key fail, in this order.
    let path = "/v1/payment_intents";
    inject(
        &s.stripe,
        serde_json::json!([
            {"key": key, "path": path, "status": 429, "count": 4, "should_retry": false},
            {"key": key, "path": path, "status": 429, "count": 4, "should_retry": true},
            {"key": key, "path": path, "status": 500, "count": 3},
            {"key": key, "path": path, "status": 503, "count": 3},
            {"key": key, "path": path, "body": "<html>502 Bad Gateway</html>", "count": 3},
            {"key": key, "path": path, "body": "{\"id\": 5, \"status\": []}", "count": 2},
            {"key": key, "path": path, "drop": true, "count": 3},
            {"key": key, "path": path, "delay_ms": 1500, "count": 2},
            {"key": key, "path": path, "status": 404, "count": 3}
        ]),
    );
    let faults = 27.0;

    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let rps = 5.0;
    let args = run_args(
        s,
        &t,
        data.path(),
        port,
        &[
            "--stripe-key",
            &key,
            "--stripe-rps",
            "5",
            "--stripe-timeout",
            "500ms",
            "--retry-backoff",
            "200ms",
            "--poll-interval",
            "4s",
            // An unknown intent backs off up to the stale cadence: here the interval itself,
            // so its gaps below are capped at 4 s.
            "--stale-poll-interval",
            "4s",
        ],
    );
    let mut daemon = spawn(&args, &logs.join("run.log"));

    let end = Instant::now() + Duration::from_secs(120);
    let answered = |outcome: &str| {
        metric(
            port,
            "paystream_polls_total",
            &[&format!("outcome=\"{outcome}\"")],
        )
    };
    let unanswered = || {
        [
            "rate_limited",
            "server_error",
            "parse_error",
            "transport_error",
            "timeout",
            "not_found",
        ]
        .iter()
        .map(|o| answered(o))
        .sum::<f64>()
    };
    while metric(port, "paystream_status_events_total", &[]) < 4.0 {
        // Until every fault was served, nothing may resolve (faults are served in order and
        // not_found also comes from the unknown intent, so compare with the injected count).
        if unanswered() < faults {
            assert_eq!(
                answered("succeeded"),
                0.0,
                "resolved during the fault storm"
            );
        }
        assert!(
            Instant::now() < end,
            "never resolved; see {}",
            logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the unknown and unsearchable payments be asked a few more times (backoff growth).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let counts: Vec<(String, f64)> = [
        "rate_limited",
        "server_error",
        "parse_error",
        "transport_error",
        "timeout",
        "not_found",
        "succeeded",
        "failed",
        "still_pending",
    ]
    .iter()
    .map(|o| (o.to_string(), answered(o)))
    .collect();
    assert!(daemon.term().success());

    // Each fault is one poll with its own outcome; nothing was resolved on any of them.
    let c = |o: &str| counts.iter().find(|(k, _)| k == o).unwrap().1;
    assert_eq!(c("rate_limited"), 8.0, "{counts:?}");
    assert_eq!(c("server_error"), 6.0, "{counts:?}");
    assert_eq!(c("parse_error"), 5.0, "{counts:?}");
    assert_eq!(c("transport_error"), 3.0, "{counts:?}");
    assert_eq!(c("timeout"), 2.0, "{counts:?}");
    assert!(
        c("not_found") >= 3.0 + 2.0,
        "injected 404s plus the unknown ids: {counts:?}"
    );
    assert_eq!((c("succeeded"), c("failed")), (4.0, 0.0), "{counts:?}");
    let events = read_all(&s.brokers, &t.status);
    let mut ids: Vec<String> = events
        .iter()
        .map(|(_, v, _)| {
            let ev: serde_json::Value = serde_json::from_slice(v.as_ref().unwrap()).unwrap();
            assert_eq!(ev["status"], "succeeded");
            ev["payment_id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    let mut want: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
    want.sort();
    assert_eq!(
        ids, want,
        "one status event per good payment, none for the others"
    );
    let store = paystream::state::Store::open(data.path()).unwrap();
    for r in [&unknown, &unsearchable] {
        let e = store
            .get(&r.id.to_string())
            .unwrap()
            .expect("still pending");
        assert!(e.emitted.is_none() && e.failures >= 3, "{e:?}");
    }

    // The budget: never more than 5 requests started in any second (the wrapper measures
    // arrival; one more at a window edge is loopback jitter, not a burst).
    let st = stripe_stats(&s.stripe, &key);
    let peak = st["max_per_second"].as_f64().unwrap();
    assert!(
        peak <= rps + 1.0,
        "peak {peak} requests/s over a budget of {rps}"
    );

    // Backoff: the unknown intent only ever fails, so after its n-th failure it waits
    // base·2^(n-1) (capped at the 4 s stale interval) times a random factor in [0.5, 1] — plus
    // whatever the rate budget and 429 cooldowns add, which only lengthen a gap. So each gap has
    // a floor that doubles until the cap, and the capped gaps differ (jitter).
    // The log is in order of completion (a delayed answer completes late): sort by start.
    let mut times: Vec<f64> = st["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r[2] == format!("/v1/payment_intents/{unknown_pi}").as_str())
        .map(|r| r[0].as_f64().unwrap())
        .collect();
    times.sort_by(f64::total_cmp);
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 6, "asked {} times: {gaps:?}", times.len());
    for (i, g) in gaps.iter().enumerate() {
        let full = (0.2 * 2f64.powi(i as i32)).min(4.0);
        assert!(
            *g >= 0.5 * full - 0.02,
            "gap {} = {g:.3}s under its floor {:.3}s: {gaps:?}",
            i + 1,
            0.5 * full
        );
        assert!(
            *g <= 4.0 + 1.5,
            "gap {} = {g:.3}s over the cap: {gaps:?}",
            i + 1
        );
    }
    let capped: Vec<f64> = gaps.iter().skip(5).copied().collect();
    let spread = capped.iter().cloned().fold(f64::MIN, f64::max)
        - capped.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        capped.len() < 2 || spread > 0.1,
        "no jitter in the capped gaps: {gaps:?}"
    );
    eprintln!(
        "fault storm: {counts:?}; peak {peak}/s (budget {rps}); unknown intent's gaps {gaps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_stripe_is_a_transport_error_not_an_answer() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "nostripe", 1).await;
    let logs = log_dir(&t.run);
    let row = insert_payment(
        &db,
        &t.table,
        &format!("{}-x", t.run),
        "1.00",
        Some("pi_whatever"),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    // Nothing listens on the discard port: connection refused.
    let args = run_args(
        s,
        &t,
        data.path(),
        port,
        &[
            "--stripe-api-base",
            "http://127.0.0.1:9",
            "--retry-backoff",
            "100ms",
            "--poll-interval",
            "1s",
        ],
    );
    let mut daemon = spawn(&args, &logs.join("run.log"));
    wait_for("three refused polls", 60, || async {
        metric(port, "paystream_polls_total", &["transport_error"]) >= 3.0
    })
    .await;
    assert_eq!(metric(port, "paystream_status_events_total", &[]), 0.0);
    assert!(daemon.term().success());
    let e = paystream::state::Store::open(data.path())
        .unwrap()
        .get(&row.id.to_string())
        .unwrap()
        .expect("still pending");
    assert!(e.emitted.is_none() && e.failures >= 3, "{e:?}");
    assert_eq!(e.last_outcome(), Some("transport_error"));
}
