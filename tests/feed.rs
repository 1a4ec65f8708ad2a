//! The events feed (`--events-feed`) against the emulator, in embedded mode (real Postgres, no
//! broker): payments Stripe resolves are resolved from `GET /v1/events` without a retrieve of
//! their own; a `payment_failed` event is doubt and is confirmed by one retrieve; a payment
//! still pending is retrieved again only after the fallback interval; every request (pages
//! included) stays within `--stripe-rps`; and when the feed fails, retrieves fall back to the
//! poll interval. Each daemon has its own Stripe key, so the emulator's log is its alone.

mod common;

use std::collections::BTreeMap;

use common::embedded::*;
use common::*;

const RPS: f64 = 10.0;

/// A test's embedded-mode world with a Stripe key of its own (so the emulator's log is its alone).
struct Setup {
    env: Env,
    key: String,
}

impl std::ops::Deref for Setup {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

async fn setup(prefix: &str) -> Setup {
    let env = env(prefix, false).await;
    Setup {
        key: format!("sk_test_{}", env.n.slot),
        env,
    }
}

impl Setup {
    async fn rows(&self, intents: &[String], prefix: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for (i, pi) in intents.iter().enumerate() {
            ids.push(
                insert(
                    &self.db,
                    &self.n.table,
                    &format!("{prefix}-{i}"),
                    "10.00",
                    Some(pi),
                )
                .await,
            );
        }
        ids
    }

    fn run(&self, port: u16, extra: &[&str]) -> Proc {
        let rps = RPS.to_string();
        let mut args = embedded_args(
            self.s,
            &self.n,
            self.dir.path(),
            port,
            &[
                "--poll-interval",
                "2s",
                "--stripe-rps",
                &rps,
                "--stripe-key",
                &self.key,
            ],
        );
        args.push("--events-feed".into());
        args.extend(extra.iter().map(|a| a.to_string()));
        spawn(&args, &self.logs.join("run.log"))
    }

    async fn statuses(&self, ids: &[i64]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for id in ids {
            *m.entry(status(&self.db, &self.n.table, *id).await)
                .or_default() += 1;
        }
        m
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_feed_resolves_without_retrieves_and_confirms_doubt() {
    let t = setup("feedok").await;
    let visa = bulk_intents(&t.s.stripe, 14, "4242424242424242", "ok-");
    let declined = bulk_intents(&t.s.stripe, 1, "4000000000000341", "no-");
    let all: Vec<String> = visa.iter().chain(&declined).cloned().collect();
    let ids = t.rows(&all, "r").await;
    let port = free_port();
    let mut run = t.run(port, &["--fallback-poll-interval", "1h"]);
    // Held and watched: the snapshot read them, a feed cycle ran. No retrieve is due before
    // the fallback interval (the feed reports resolutions).
    wait_for("state holds them and the feed ran", 30, || async {
        state_amounts(port).is_some_and(|m| m.len() == all.len())
            && metric(port, "paystream_feed_pages_total", &["result=\"ok\""]) >= 3.0
    })
    .await;

    // Stripe resolves some: ten succeed, one is declined, one is canceled.
    let at = confirm(&t.s.stripe, &visa[..10]);
    confirm(&t.s.stripe, &declined);
    stripe_post(
        &t.s.stripe,
        &format!("/v1/payment_intents/{}/cancel", visa[10]),
        &[],
    );
    let started = std::time::Instant::now();
    // The decline is an attempt: its payment stays pending with the three Stripe still calls
    // pending.
    wait_for("the resolved payments written back", 30, || async {
        t.statuses(&ids).await
            == BTreeMap::from([
                ("succeeded".into(), 10),
                ("failed".into(), 1),
                ("pending".into(), 4),
            ])
    })
    .await;
    // Printed, not asserted (timings are the benchmark's: scripts/bench --only feed).
    let took = started.elapsed().as_secs_f64();
    // The payment_failed event made the declined intent due for a retrieve, which recorded the
    // decline.
    wait_for("the decline recorded", 30, || async {
        metric(port, "paystream_declines_total", &[]) >= 1.0
    })
    .await;

    let (log, _) = requests(&t.s.stripe, &t.key);
    for pi in visa[..11].iter() {
        assert_eq!(
            retrieves_of(&log, pi, at),
            0,
            "{pi} resolved from the feed, no retrieve"
        );
    }
    assert_eq!(
        retrieves_of(&log, &declined[0], at),
        1,
        "payment_failed is confirmed by one retrieve"
    );
    // Still pending in Stripe: left to the feed, not retrieved before the fallback interval.
    for pi in &visa[11..] {
        assert_eq!(
            retrieves_of(&log, pi, 0.0),
            0,
            "{pi} retrieved before the fallback interval"
        );
    }
    assert_eq!(
        metric(
            port,
            "paystream_feed_matches_total",
            &["verdict=\"resolved\""]
        ),
        11.0
    );
    assert_eq!(
        metric(
            port,
            "paystream_feed_matches_total",
            &["verdict=\"confirm\""]
        ),
        1.0
    );
    let pages = log.iter().filter(|(_, _, p)| p == "/v1/events").count();
    assert!(pages >= 3, "{pages} pages");
    // The customer retries the declined intent with another card: the feed's
    // payment_intent.succeeded resolves it, with no further retrieve.
    assert_eq!(
        retry_intent(&t.s.stripe, &declined[0], "4242424242424242"),
        "succeeded"
    );
    wait_for("the retried payment written back", 30, || async {
        t.statuses(&ids).await
            == BTreeMap::from([
                ("succeeded".into(), 11),
                ("failed".into(), 1),
                ("pending".into(), 3),
            ])
    })
    .await;
    let (log, peak) = requests(&t.s.stripe, &t.key);
    assert_eq!(
        retrieves_of(&log, &declined[0], at),
        1,
        "the retry's success came from the feed"
    );
    // Arrival times at the emulator: one more at a window's edge is jitter (tests/faults.rs).
    assert!(
        peak <= RPS + 1.0,
        "{peak} requests in one second with --stripe-rps {RPS}"
    );
    eprintln!(
        "resolved {took:.1}s after Stripe; {} requests in all ({pages} event pages) for {} payments, 12 resolved; peak {peak}/s",
        log.len(),
        all.len()
    );
    t.finish(&mut run).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_feed_falls_back_to_the_poll_interval() {
    let t = setup("feedfail").await;
    let pending = bulk_intents(&t.s.stripe, 3, "4242424242424242", "ff-");
    t.rows(&pending, "f").await;
    // The feed fails from the start (every events page answers 500, as for a key that may not
    // read events): two intervals after the start, payments are retrieved every interval.
    emulator_post(
        &t.s.stripe,
        "/_paystream/faults",
        &serde_json::json!({"status": 500, "count": 1000, "path": "/v1/events", "key": t.key}),
    );
    let port = free_port();
    let mut run = t.run(port, &["--fallback-poll-interval", "1h"]);
    wait_for(
        "retrieves at the poll interval despite the 1h fallback",
        30,
        || async {
            metric(
                port,
                "paystream_polls_total",
                &["outcome=\"still_pending\""],
            ) >= 9.0
        },
    )
    .await;
    let (log, _) = requests(&t.s.stripe, &t.key);
    for pi in &pending {
        assert!(
            retrieves_of(&log, pi, 0.0) >= 2,
            "{pi} polled at the interval"
        );
    }
    assert!(
        metric(
            port,
            "paystream_feed_pages_total",
            &["result=\"server_error\""]
        ) >= 1.0
    );
    clear_faults(&t.s.stripe);
    t.finish(&mut run).await;
}

/// Without the feed, more pending payments than the budget can poll each interval: the poll
/// lag gauge says how far behind, and the daemon warns with how many payments are overdue.
#[tokio::test(flavor = "multi_thread")]
async fn a_budget_that_cannot_keep_the_interval_is_reported() {
    let t = setup("feedlag").await;
    let intents = bulk_intents(&t.s.stripe, 50, "4242424242424242", "lag-");
    t.rows(&intents, "l").await;
    let port = free_port();
    // No --events-feed: one retrieve per payment per interval.
    let args = embedded_args(
        t.s,
        &t.n,
        t.dir.path(),
        port,
        &["--stripe-rps", "2", "--stripe-key", &t.key],
    );
    let mut run = spawn(&args, &t.logs.join("run.log"));
    // 50 payments every second need 50 requests/s; 2 are allowed.
    wait_for("the lag reported", 60, || async {
        metric(port, "paystream_poll_lag_seconds", &[]) > 5.0
    })
    .await;
    wait_for("the warning logged", 30, || async {
        std::fs::read_to_string(t.logs.join("run.log"))
            .unwrap_or_default()
            .contains("Stripe budget does not keep the poll interval")
    })
    .await;
    let log = std::fs::read_to_string(t.logs.join("run.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("Stripe budget does not keep the poll interval"))
        .unwrap();
    // The text log colours field names: compare without the escape sequences.
    let plain = strip_ansi(line);
    assert!(
        plain.contains("overdue_payments=") && plain.contains("behind_s="),
        "{plain}"
    );
    // The emulator measures arrival: one more at a window's edge is loopback jitter (as in
    // tests/faults.rs), not a burst.
    let (_, peak) = requests(&t.s.stripe, &t.key);
    assert!(
        peak <= 2.0 + 1.0,
        "{peak} requests in one second with --stripe-rps 2"
    );
    t.finish(&mut run).await;
}

/// `line` without ANSI escape sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Stripe lists events newest first, so a cycle paging through many events does not see those
/// created after its first page. Its cursor must not pass them: with no overlap re-read
/// (`--events-feed-overlap 0s`), only the cursor's rule (the newest event of one complete
/// listing of all three types) keeps them for the next cycle. While slow cycles page through
/// hundreds of older events, Stripe settles six payments one by one, and an event of another
/// type follows: every payment resolves from the feed, none waits for the fallback retrieve.
#[tokio::test(flavor = "multi_thread")]
async fn events_created_during_a_long_listing_are_not_skipped() {
    let t = setup("feedskip").await;
    // Older events of other payments: each cycle pages through them, 100 a page.
    let noise = bulk_intents(&t.s.stripe, 450, "4242424242424242", "noise-");
    confirm(&t.s.stripe, &noise);
    let mine = bulk_intents(&t.s.stripe, 6, "4242424242424242", "skip-");
    let later = bulk_intents(&t.s.stripe, 1, "4242424242424242", "later-");
    let ids = t.rows(&mine, "s").await;
    let port = free_port();
    let mut run = t.run(
        port,
        &[
            "--fallback-poll-interval",
            "1h",
            "--events-feed-overlap",
            "0s",
        ],
    );
    wait_for("state holds them and the feed ran", 30, || async {
        state_amounts(port).is_some_and(|m| m.len() == mine.len())
            && metric(port, "paystream_feed_pages_total", &["result=\"ok\""]) >= 5.0
    })
    .await;
    // From now on every events page of this daemon takes 400 ms (its next 80 pages: about a
    // dozen cycles; the fault is this key's alone and needs no cleanup): a cycle lasts seconds.
    emulator_post(
        &t.s.stripe,
        "/_paystream/faults",
        &serde_json::json!({"path": "/v1/events", "key": t.key, "delay_ms": 400, "count": 80}),
    );
    let at = confirm(&t.s.stripe, &mine[..1]);
    for pi in &mine[1..] {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        confirm(&t.s.stripe, std::slice::from_ref(pi));
    }
    // A newer event of another type, listed after the succeeded ones by a per-type listing.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    stripe_post(
        &t.s.stripe,
        &format!("/v1/payment_intents/{}/cancel", later[0]),
        &[],
    );
    wait_for("every payment resolved from the feed", 60, || async {
        t.statuses(&ids).await == BTreeMap::from([("succeeded".into(), mine.len())])
    })
    .await;
    let (log, _) = requests(&t.s.stripe, &t.key);
    for pi in &mine {
        assert_eq!(
            retrieves_of(&log, pi, at),
            0,
            "{pi} was not resolved from the feed"
        );
    }
    let pages = log
        .iter()
        .filter(|(t, _, p)| *t > at && p == "/v1/events")
        .count();
    eprintln!("{pages} event pages after the first confirm");
    t.finish(&mut run).await;
}
