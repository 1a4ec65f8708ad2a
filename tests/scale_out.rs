//! Scale-out on the consumer group, with real processes on the dev broker: two, then three
//! instances share a 6-partition CDC topic fed by real Debezium (`common::cdc`); one is killed with SIGKILL while new payments keep
//! arriving; one is stopped and a stale one comes back. Every Stripe call is logged by the
//! emulator under the calling instance's own API key, so the test sees who polled what, when.
//!
//! It checks, from those logs, the state changelog's metrics and Postgres:
//! - a payment is never polled by two instances at once: consecutive polls of any intent, all
//!   instances merged, are at least half an interval apart, and within each quiet phase every
//!   intent is polled by one instance only;
//! - no payment is forgotten: a killed instance's payments are polled by their new owners within
//!   one interval plus the session timeout, plus the dev broker's own rebalance terms (one
//!   heartbeat and its fixed join pause of half a session; see `BROKER_JOIN_PAUSE`), and no
//!   intent goes longer than one interval more than that without a poll;
//! - state follows the partitions: instances that join restore from the changelog and read no
//!   CDC event again (their `paystream_cdc_events_total` stays at what is new);
//! - everything ends resolved once: one status event per payment, one status change per row.
//!
//! It prints the failover time (kill → first poll by a new owner) and the restore throughput.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const INTERVAL: f64 = 3.0;
const SESSION: f64 = 6.0;
/// `heartbeat.interval.ms` of the tests (`KAFKA_TEST_OPTIONS`): a dead member is evicted at the
/// first survivor heartbeat after its session ran out, and survivors learn of the rebalance
/// from a heartbeat's answer.
const HEARTBEAT: f64 = 1.0;
/// The dev broker holds every JoinGroup until half the session has passed since the join
/// began (nisshi 0.7.0-pre.2, coordinator/group/administrator.rs: `join` sleeps in 1 s steps
/// while `elapsed_ms < session_timeout_ms / 2`). Kafka itself answers a rebalance's joins once
/// every known member rejoined (its `group.initial.rebalance.delay.ms` only delays an empty
/// group's first join), so there this term is about zero.
const BROKER_JOIN_PAUSE: f64 = SESSION / 2.0;
/// The bound for a killed instance's payments: one interval plus the session timeout,
/// plus what the dev broker's group protocol adds on top (the two terms above). paystream's
/// own share, the restore and the first poll, is milliseconds (docs/scaling-out.md).
const FAILOVER_OK: f64 = INTERVAL + SESSION + HEARTBEAT + BROKER_JOIN_PAUSE;

/// An intent that stays `requires_action` (pending to paystream) until canceled.
fn pending_intent(base: &str, amount: &str) -> String {
    let pm = card_pm(base, "4000002760003184");
    let pi = stripe_post(
        base,
        "/v1/payment_intents",
        &[
            ("amount", amount),
            ("currency", "usd"),
            ("payment_method", &pm),
        ],
    );
    let id = pi["id"].as_str().unwrap().to_string();
    let c = stripe_post(base, &format!("/v1/payment_intents/{id}/confirm"), &[]);
    assert_eq!(c["status"], "requires_action", "{c}");
    id
}

/// Every retrieve of an intent made with `key`: (emulator time, intent id).
fn polls(base: &str, key: &str) -> Vec<(f64, String)> {
    requests(base, key)
        .0
        .into_iter()
        .filter(|(_, method, _)| method == "GET")
        .filter_map(|(at, _, path)| {
            let id = path.strip_prefix("/v1/payment_intents/")?;
            Some((at, id.to_string()))
        })
        .collect()
}

/// The emulator's clock now: one request under a key of its own, read back from its log.
fn emulator_now(base: &str, run: &str) -> f64 {
    let key = format!("sk_test_{run}_mark{}", unique(""));
    let _ = std::process::Command::new("curl")
        .args(["-sS", "-H", &format!("Authorization: Bearer {key}")])
        .arg(format!("{base}/v1/payment_intents/pi_mark"))
        .output();
    requests(base, &key)
        .0
        .first()
        .expect("the mark request is logged")
        .0
}

struct Instance {
    name: &'static str,
    key: String,
    port: u16,
    proc: Option<Proc>,
}

impl Instance {
    fn start(s: &Stack, t: &Topics, name: &'static str, dir: &Path, logs: &Path) -> Instance {
        let key = format!("sk_test_{}_{name}", t.run);
        let port = free_port();
        let mut args = run_args(
            s,
            t,
            &dir.join(name),
            port,
            &["--poll-interval", "3s", "--stripe-key", &key],
        );
        args.push("--changelog".into());
        let proc = spawn(&args, &logs.join(format!("{name}.log")));
        Instance {
            name,
            key,
            port,
            proc: Some(proc),
        }
    }

    fn restart(&mut self, s: &Stack, t: &Topics, dir: &Path, logs: &Path) {
        *self = Instance::start(s, t, self.name, dir, logs);
    }

    fn assigned(&self) -> f64 {
        metric(self.port, "paystream_partitions_assigned", &[])
    }
}

/// Waits until the running instances own all six partitions between them, each some.
async fn wait_balanced(running: &[&Instance], secs: u64) {
    let what = format!(
        "six partitions spread over {:?}",
        running.iter().map(|i| i.name).collect::<Vec<_>>()
    );
    wait_for(&what, secs, || async {
        let a: Vec<f64> = running.iter().map(|i| i.assigned()).collect();
        a.iter().sum::<f64>() == 6.0 && a.iter().all(|n| *n >= 1.0)
    })
    .await;
}

/// Each intent polled by one instance only between `from` and `to` (emulator time).
fn one_poller_each(all: &BTreeMap<&str, Vec<(f64, String)>>, from: f64, to: f64, phase: &str) {
    let mut by_intent: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (who, log) in all {
        for (t, id) in log {
            if *t >= from && *t <= to {
                by_intent.entry(id).or_default().insert(who);
            }
        }
    }
    assert!(!by_intent.is_empty(), "{phase}: no polls at all");
    for (id, who) in &by_intent {
        assert_eq!(who.len(), 1, "{phase}: {id} polled by {who:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_share_partitions_and_hand_state_over() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "scale", 6).await;
    let logs = log_dir(&t.run);
    let dir = tempfile::tempdir().unwrap();
    eprintln!("logs: {}", logs.display());
    let base: i64 =
        t.run.trim_start_matches("scale").parse::<i64>().unwrap() % 1_000_000 * 1_000_000;
    install_status_audit(&db, &t.table).await;

    let mut rows = Vec::new();
    let mut intents = BTreeSet::new();
    for i in 0..42 {
        let pi = pending_intent(&s.stripe, &(500 + i).to_string());
        intents.insert(pi.clone());
        let r = Row {
            id: base + i,
            idempotency_key: format!("{}-{i}", t.run),
            amount: format!("5.{:02}", i),
            currency: "usd".into(),
            status: "pending".into(),
            intent: Some(pi),
        };
        rows.push(r);
    }
    let (first, later) = rows.split_at(30);
    for r in first {
        cdc_insert(&db, &t, r).await;
    }

    // One instance, then two, then three.
    let mut a = Instance::start(s, &t, "a", dir.path(), &logs);
    wait_for("a holds all 30", 60, || async {
        a.assigned() == 6.0 && metric(a.port, "paystream_cdc_events_total", &[]) >= 30.0
    })
    .await;
    let mut b = Instance::start(s, &t, "b", dir.path(), &logs);
    wait_balanced(&[&a, &b], 60).await;
    let two_from = emulator_now(&s.stripe, &t.run) + INTERVAL;
    tokio::time::sleep(Duration::from_secs_f64(3.0 * INTERVAL)).await;
    let two_to = emulator_now(&s.stripe, &t.run);
    let mut c = Instance::start(s, &t, "c", dir.path(), &logs);
    wait_balanced(&[&a, &b, &c], 60).await;
    let three_from = emulator_now(&s.stripe, &t.run) + INTERVAL;
    tokio::time::sleep(Duration::from_secs_f64(3.0 * INTERVAL)).await;
    let three_to = emulator_now(&s.stripe, &t.run);
    for i in [&b, &c] {
        assert!(
            metric(
                i.port,
                "paystream_partition_takeovers_total",
                &["how=\"restored\""]
            ) >= 1.0,
            "{} restored its partitions from the changelog",
            i.name
        );
        assert_eq!(
            metric(i.port, "paystream_cdc_events_total", &[]),
            0.0,
            "{} read no CDC event again: state came from the changelog",
            i.name
        );
    }

    // SIGKILL under load: a's partitions move; new payments arrive meanwhile.
    let a_polled: BTreeSet<String> = polls(&s.stripe, &a.key)
        .into_iter()
        .filter(|(tm, _)| *tm > three_to - INTERVAL - 1.0)
        .map(|(_, id)| id)
        .collect();
    assert!(!a_polled.is_empty(), "a polled nothing before the kill");
    let killed_at = emulator_now(&s.stripe, &t.run);
    let killed = Instant::now();
    a.proc.as_mut().unwrap().kill9();
    for r in later {
        cdc_insert(&db, &t, r).await;
    }
    wait_balanced(&[&b, &c], 60).await;
    let rebalanced_in = killed.elapsed();
    let mut failover = Vec::new();
    wait_for("every payment a held polled by a new owner", 60, || {
        let mut firsts = Vec::new();
        let all: Vec<(f64, String)> = [&b.key, &c.key]
            .iter()
            .flat_map(|k| polls(&s.stripe, k))
            .collect();
        for id in &a_polled {
            if let Some(tm) = all
                .iter()
                .filter(|(tm, i)| i == id && *tm > killed_at)
                .map(|(tm, _)| *tm)
                .reduce(f64::min)
            {
                firsts.push(tm - killed_at);
            }
        }
        let done = firsts.len() == a_polled.len();
        failover = firsts;
        async move { done }
    })
    .await;
    failover.sort_by(f64::total_cmp);
    assert!(
        failover[failover.len() - 1] <= FAILOVER_OK,
        "the last moved payment was polled by its new owner {:.1}s after the kill (bound {FAILOVER_OK}s)",
        failover[failover.len() - 1]
    );
    eprintln!(
        "failover: group rebalanced {:.1}s after the kill; first poll of a moved payment by its new owner {:.1}s after, the last of {} moved payments {:.1}s after",
        rebalanced_in.as_secs_f64(),
        failover[0],
        failover.len(),
        failover[failover.len() - 1]
    );

    // Scale down to one, then up to two again: a comes back with stale local state.
    assert!(b.proc.as_mut().unwrap().term().success());
    wait_for("c owns all six", 60, || async { c.assigned() == 6.0 }).await;
    tokio::time::sleep(Duration::from_secs_f64(INTERVAL)).await;
    a.restart(s, &t, dir.path(), &logs);
    wait_balanced(&[&a, &c], 60).await;
    tokio::time::sleep(Duration::from_secs_f64(2.0 * INTERVAL)).await;
    assert!(
        metric(
            a.port,
            "paystream_partition_takeovers_total",
            &["how=\"restored\""]
        ) >= 1.0,
        "a restored what moved while it was away"
    );
    assert_eq!(
        metric(a.port, "paystream_cdc_events_total", &[]),
        0.0,
        "a replayed no CDC event: the changelog's markers say where to resume"
    );
    let end = emulator_now(&s.stripe, &t.run);

    // Who polled what, over the whole run.
    let mut all: BTreeMap<&str, Vec<(f64, String)>> = BTreeMap::new();
    for i in [&a, &b, &c] {
        all.insert(i.name, polls(&s.stripe, &i.key));
    }
    one_poller_each(&all, two_from, two_to, "two instances");
    one_poller_each(&all, three_from, three_to, "three instances");
    let mut merged: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for log in all.values() {
        for (tm, id) in log {
            merged.entry(id).or_default().push(*tm);
        }
    }
    let first_poll_ok = INTERVAL + 1.0;
    // A payment polled just before the kill waits up to one interval more than the failover.
    let longest_ok = INTERVAL + FAILOVER_OK;
    let mut longest = 0f64;
    for id in &intents {
        let mut ts = merged.get(id.as_str()).cloned().unwrap_or_default();
        ts.sort_by(f64::total_cmp);
        assert!(ts.len() >= 3, "{id} polled {} times", ts.len());
        for w in ts.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= INTERVAL / 2.0,
                "{id} polled twice within {gap:.2}s (by two owners?)"
            );
            longest = longest.max(gap);
        }
        assert!(
            end - ts[ts.len() - 1] <= first_poll_ok + INTERVAL,
            "{id} not polled lately"
        );
    }
    assert!(
        longest <= longest_ok,
        "a payment went {longest:.1}s without a poll"
    );
    eprintln!("longest time any payment went without a poll: {longest:.1}s (interval {INTERVAL}s, session {SESSION}s)");
    let restored: f64 = [&a, &c]
        .iter()
        .map(|i| metric(i.port, "paystream_changelog_restored_records_total", &[]))
        .sum();
    let restore_s: f64 = [&a, &c]
        .iter()
        .map(|i| {
            metric(
                i.port,
                "paystream_changelog_restore_duration_seconds_sum",
                &[],
            )
        })
        .sum();
    eprintln!("restore (a and c, still running): {restored} records in {restore_s:.3}s");

    // Every payment resolved once: Stripe cancels them all; the updater writes back.
    for pi in &intents {
        stripe_post(&s.stripe, &format!("/v1/payment_intents/{pi}/cancel"), &[]);
    }
    let mut updater = spawn(&table_updater_args(s, &t, &[]), &logs.join("updater.log"));
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    wait_for("all 42 rows resolved", 90, || async {
        count(
            &db,
            &format!(
                "SELECT count(*) FROM {} WHERE id = ANY($1) AND status = 'failed'",
                t.table
            ),
            &[&ids],
        )
        .await
            == 42
    })
    .await;
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM {} WHERE id = ANY($1)",
                audit_table(&t.table)
            ),
            &[&ids]
        )
        .await,
        42,
        "one status change per row"
    );
    let mut per_payment: BTreeMap<String, usize> = BTreeMap::new();
    for (k, _, _) in read_all(&s.brokers, &t.status) {
        *per_payment
            .entry(String::from_utf8(k.unwrap()).unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_payment.len(), 42);
    assert!(
        per_payment.values().all(|n| *n == 1),
        "a status event emitted twice: {per_payment:?}"
    );
    assert!(updater.term().success());
    for i in [&mut a, &mut c] {
        assert!(
            i.proc.as_mut().unwrap().term().success(),
            "{} stops cleanly",
            i.name
        );
    }
    assert_no_panic(&logs);
}

fn signal(p: &Proc, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig}");
}

/// A zombie: an instance paused (SIGSTOP) past its session timeout while its partitions move
/// and Stripe settles every payment, then resumed with overdue polls in its local state. Its
/// group lease has lapsed, so it neither asks Stripe nor emits until the group gives it
/// partitions again: every payment gets exactly one status event, from the live owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_that_lost_its_partitions_emits_nothing() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "zombie", 2).await;
    let logs = log_dir(&t.run);
    let dir = tempfile::tempdir().unwrap();
    eprintln!("logs: {}", logs.display());
    let base: i64 =
        t.run.trim_start_matches("zombie").parse::<i64>().unwrap() % 1_000_000 * 1_000_000;
    let mut intents = Vec::new();
    for i in 0..10 {
        let pi = pending_intent(&s.stripe, &(700 + i).to_string());
        let r = Row {
            id: base + i,
            idempotency_key: format!("{}-{i}", t.run),
            amount: "7.00".into(),
            currency: "usd".into(),
            status: "pending".into(),
            intent: Some(pi.clone()),
        };
        cdc_insert(&db, &t, &r).await;
        intents.push(pi);
    }
    let a = Instance::start(s, &t, "a", dir.path(), &logs);
    wait_for("a holds all ten", 60, || async {
        a.assigned() == 2.0 && metric(a.port, "paystream_cdc_events_total", &[]) >= 10.0
    })
    .await;
    let b = Instance::start(s, &t, "b", dir.path(), &logs);
    let two = [&a, &b];
    wait_for("one partition each", 60, || async {
        two.iter().all(|i| i.assigned() == 1.0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs_f64(INTERVAL)).await;

    // Paused past the session timeout: b takes both partitions, Stripe settles everything,
    // b emits every status.
    signal(a.proc.as_ref().unwrap(), "-STOP");
    wait_for("b owns both", 60, || async { b.assigned() == 2.0 }).await;
    for pi in &intents {
        stripe_post(&s.stripe, &format!("/v1/payment_intents/{pi}/cancel"), &[]);
    }
    wait_for("b emitted all ten", 60, || async {
        metric(b.port, "paystream_status_events_total", &[]) >= 10.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs_f64(INTERVAL)).await;
    signal(a.proc.as_ref().unwrap(), "-CONT");
    wait_for("a back in the group", 60, || async {
        two.iter().all(|i| i.assigned() == 1.0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs_f64(2.0 * INTERVAL)).await;

    let mut per_payment: BTreeMap<String, usize> = BTreeMap::new();
    for (k, _, _) in read_all(&s.brokers, &t.status) {
        *per_payment
            .entry(String::from_utf8(k.unwrap()).unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_payment.len(), 10, "{per_payment:?}");
    assert!(
        per_payment.values().all(|n| *n == 1),
        "the zombie emitted: {per_payment:?}"
    );
    assert_eq!(metric(a.port, "paystream_status_events_total", &[]), 0.0);
    let fenced = metric(a.port, "paystream_polls_fenced_total", &[]);
    eprintln!("the zombie's polls withheld by its lapsed lease: {fenced}");
    for mut i in [a, b] {
        assert!(
            i.proc.as_mut().unwrap().term().success(),
            "{} stops cleanly",
            i.name
        );
    }
    assert_no_panic(&logs);
}
