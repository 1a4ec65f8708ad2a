//! Stripe faults never resolve a payment: 429, 503 and a slow answer past the timeout keep it
//! pending, each is counted, and the payment resolves once Stripe answers again. Against the
//! real emulator, with faults injected by the project's wrapper.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn inject(base: &str, faults: serde_json::Value) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            &format!("{base}/_paystream/faults"),
            "-d",
            &faults.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_errors_back_off_and_never_resolve() {
    let s = stack();
    let t = topics(s, "ft", 1).await;
    let (pi, st) = intent_with_card(&s.stripe, "700", "4242424242424242");
    assert_eq!(st, "succeeded");
    let db = pg(&s.pg_url).await;
    let row = insert_payment(&db, &format!("{}-faulty", t.run), "7.00", Some(&pi)).await;

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
    publish(
        &producer(&s.brokers),
        &t.cdc,
        Some(&cdc_key(row.id)),
        Some(&cdc_value("c", &row, false)),
    )
    .await;

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
