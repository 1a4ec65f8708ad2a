//! Bad configuration fails fast with one clear line naming the problem and a non-zero exit;
//! secrets never reach logs, `--help`, errors or the metrics endpoint.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const STRIPE_SECRET: &str = "sk_test_Zq9SECRETstripeKEY4242";
const PG_SECRET: &str = "hunter2-SECRET-pg-password";

fn paystream(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_paystream"));
    cmd.args(args)
        .env_remove("STRIPE_SECRET_KEY")
        .env_remove("PAYSTREAM_STRIPE_KEY")
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Runs a command that must fail at start: within `secs`, non-zero exit, and a last stderr line
/// that says `Error:` and contains every one of `expect`. Returns stderr.
fn fails_fast(args: &[&str], envs: &[(&str, &str)], expect: &[&str], secs: u64) -> String {
    let started = Instant::now();
    let out = paystream(args, envs);
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} exited 0:\n{err}");
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        last.starts_with("Error:"),
        "{args:?}: last line is not the error:\n{err}"
    );
    for e in expect {
        // Once: a cause repeated in its wrapper's text would show twice in the chain.
        assert_eq!(
            last.matches(e).count(),
            1,
            "{args:?}: {e:?} not once in {last:?}"
        );
    }
    assert!(
        took < Duration::from_secs(secs),
        "{args:?} took {took:?} to fail"
    );
    err
}

/// A `run` command line that is valid except for what the caller appends.
fn run_base(data: &str) -> Vec<String> {
    [
        "run",
        "--brokers",
        "127.0.0.1:9",
        "--stripe-key",
        STRIPE_SECRET,
        "--data-dir",
        data,
        "--metrics-addr",
        "127.0.0.1:0",
        "--kafka-startup-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn with<'a>(base: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .collect()
}

#[test]
fn bad_configuration_fails_fast_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let base = run_base(data.to_str().unwrap());

    // A zero poll interval, an empty Stripe key, a bad duration, a bad flag value.
    fails_fast(
        &with(&base, &["--poll-interval", "0s"]),
        &[],
        &["--poll-interval", "at least"],
        5,
    );
    fails_fast(
        &with(&base, &["--state-stats-interval", "500ms"]),
        &[],
        &["--state-stats-interval", "whole seconds"],
        5,
    );
    // Avro without a registry, and a registry URL that is not http(s).
    fails_fast(
        &with(&base, &["--format", "avro"]),
        &[],
        &["--schema-registry-url", "required with --format avro"],
        5,
    );
    fails_fast(
        &with(&base, &["--status-format", "avro"]),
        &[],
        &[
            "--schema-registry-url",
            "required with --status-format avro",
        ],
        5,
    );
    fails_fast(
        &with(&base, &["--schema-registry-url", "registry:8081"]),
        &[],
        &["--schema-registry-url", "http(s) URL"],
        5,
    );
    // The admin address taken by another process.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut in_use: Vec<&str> = with(&base, &[]);
    let i = in_use.iter().position(|a| *a == "--metrics-addr").unwrap();
    in_use[i + 1] = &addr;
    fails_fast(
        &in_use,
        &[],
        &["--metrics-addr", "Address already in use"],
        5,
    );
    let no_key: Vec<&str> = with(&base, &[])
        .into_iter()
        .map(|a| if a == STRIPE_SECRET { "" } else { a })
        .collect();
    fails_fast(&no_key, &[], &["--stripe-key", "required"], 5);
    let e = paystream(&with(&base, &["--checkpoint-interval", "soon"]), &[]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("--checkpoint-interval"));

    // Unknown keys in the config file, named with the file.
    let cfg = dir.path().join("paystream.toml");
    std::fs::write(&cfg, "poll-intervall = \"1m\"\n").unwrap();
    fails_fast(
        &with(&base, &["--config", cfg.to_str().unwrap()]),
        &[],
        &["unknown key \"poll-intervall\"", "paystream.toml"],
        5,
    );

    // A data dir that cannot be created (its parent is a file).
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let bad_dir = file.join("state");
    let bad = run_base(bad_dir.to_str().unwrap());
    fails_fast(&with(&bad, &[]), &[], &["state store", "a-file/state"], 5);

    // Unreachable brokers at start: a clear line after --kafka-startup-timeout, not a hang.
    fails_fast(
        &with(&base, &[]),
        &[],
        &["cannot reach Kafka at 127.0.0.1:9", "--brokers"],
        20,
    );
    fails_fast(
        &[
            "updater",
            "--brokers",
            "127.0.0.1:9",
            "--postgres-url",
            &stack().pg_url,
            "--metrics-addr",
            "127.0.0.1:0",
            "--kafka-startup-timeout",
            "2s",
        ],
        &[],
        &["cannot reach Kafka at 127.0.0.1:9"],
        20,
    );
    fails_fast(
        &["updater", "--metrics-addr", "127.0.0.1:0"],
        &[("PAYSTREAM_POSTGRES_URL", "")],
        &["--postgres-url", "required"],
        5,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_in_use_by_another_instance_is_refused() {
    let s = stack();
    let t = topics(s, "lock", 1).await;
    let data = tempfile::tempdir().unwrap();
    let logs = log_dir(&t.run);
    let port = free_port();
    let mut first = spawn(
        &run_args(s, &t, data.path(), port, &[]),
        &logs.join("first.log"),
    );
    wait_for("the first instance to listen", 30, || async {
        http_get(port, "/healthz").is_some()
    })
    .await;
    let second = run_args(s, &t, data.path(), free_port(), &[]);
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    fails_fast(
        &second,
        &[],
        &["in use by another process", data.path().to_str().unwrap()],
        10,
    );
    assert!(first.term().success(), "the first instance is unharmed");
}

/// The recovery check runs beside the start (it takes seconds on a big store), but a store that
/// fails it still stops the daemon with the check's error, and nothing is written to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_store_that_fails_its_recovery_check_stops_the_daemon() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "corrupt", 1).await;
    let data = tempfile::tempdir().unwrap();
    drop(paystream::state::Store::open(data.path()).unwrap());
    {
        // An entry the last checkpoint never counted, and not JSON.
        let db = sled::open(data.path()).unwrap();
        db.insert(b"p\0ghost", &b"not json"[..]).unwrap();
        db.flush().unwrap();
    }
    // An event to consume (a row Debezium carries): a checkpoint, had one run, would store
    // its offset.
    let row = Row {
        id: 1,
        idempotency_key: "k-1".into(),
        amount: "1.00".into(),
        currency: "usd".into(),
        status: "pending".into(),
        intent: None,
    };
    cdc_insert(&db, &t, &row).await;
    wait_for("Debezium's event on the topic", 60, || async {
        high_watermarks(&s.brokers, &t.cdc)
            .iter()
            .map(|(_, h)| h)
            .sum::<i64>()
            == 1
    })
    .await;
    let args = run_args(s, &t, data.path(), free_port(), &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_fast(
        &args,
        &[],
        &["failed its recovery check", "entry ghost does not parse"],
        30,
    );
    let db = sled::open(data.path()).unwrap();
    assert_eq!(
        db.scan_prefix(b"o\0").count(),
        0,
        "an offset was checkpointed"
    );
    let entries: Vec<_> = db.scan_prefix(b"p\0").keys().map(|k| k.unwrap()).collect();
    assert_eq!(entries, vec![sled::IVec::from(&b"p\0ghost"[..])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_help_errors_or_metrics() {
    let s = stack();
    let db = pg(&s.pg_url).await;
    let t = cdc_topics(s, &db, "secret", 1).await;
    let logs = log_dir(&t.run);
    let data = tempfile::tempdir().unwrap();
    let pg_url = format!("{} password={PG_SECRET}", s.pg_url);

    // --help with the secrets in the environment: clap must not print their values.
    let help = paystream(&["run", "--help"], &[("STRIPE_SECRET_KEY", STRIPE_SECRET)]);
    let help_up = paystream(
        &["updater", "--help"],
        &[("PAYSTREAM_POSTGRES_URL", &pg_url)],
    );
    // A configuration error while the secrets are set.
    let err = paystream(
        &[
            "run",
            "--poll-interval",
            "0s",
            "--stripe-key",
            STRIPE_SECRET,
        ],
        &[],
    );

    // The daemon and the updater at the most verbose log level, doing real work: a payment
    // polled (so the key is sent) and status events written (so Postgres is used).
    let port = free_port();
    let mut args = run_args(s, &t, data.path(), port, &[]);
    let k = args.iter().position(|a| a == "--stripe-key").unwrap();
    args[k + 1] = STRIPE_SECRET.into();
    let mut daemon = spawn_logging(&args, &logs.join("run.log"), "trace");
    let up_port = free_port();
    let mut up_args = table_updater_args(s, &t, &[]);
    let i = up_args.iter().position(|a| a == "--postgres-url").unwrap();
    up_args[i + 1] = pg_url.clone();
    let j = up_args.iter().position(|a| a == "--metrics-addr").unwrap();
    up_args[j + 1] = format!("127.0.0.1:{up_port}");
    let mut updater = spawn_logging(&up_args, &logs.join("updater.log"), "trace");
    let (pi, _) = intent_with_card(&s.stripe, "1200", "4242424242424242");
    let row = insert_payment(
        &db,
        &t.table,
        &format!("{}-secret", t.run),
        "12.00",
        Some(&pi),
    )
    .await;
    wait_for("the payment written by the updater", 60, || async {
        read_payment(&db, &t.table, row.id).await.status == "succeeded"
    })
    .await;
    let metrics = http_get(port, "/metrics").unwrap().1;
    let up_metrics = http_get(up_port, "/metrics").unwrap().1;
    let ready = http_get(port, "/readyz").unwrap().1;
    assert!(daemon.term().success());
    assert!(updater.term().success());

    let run_log = std::fs::read_to_string(logs.join("run.log")).unwrap();
    let up_log = std::fs::read_to_string(logs.join("updater.log")).unwrap();
    assert!(
        run_log.contains("status event emitted"),
        "the daemon did real work"
    );
    assert!(
        up_log.contains("status applied"),
        "the updater did real work"
    );
    for (what, text) in [
        (
            "run --help",
            String::from_utf8_lossy(&help.stdout).into_owned(),
        ),
        (
            "updater --help",
            String::from_utf8_lossy(&help_up.stdout).into_owned(),
        ),
        (
            "a configuration error",
            String::from_utf8_lossy(&err.stderr).into_owned(),
        ),
        ("the daemon's trace log", run_log),
        ("the updater's trace log", up_log),
        ("the daemon's /metrics", metrics),
        ("the updater's /metrics", up_metrics),
        ("/readyz", ready),
    ] {
        assert!(!text.is_empty(), "{what} is empty");
        // The whole secrets and distinctive pieces of them (a log could cut or wrap one).
        for secret in [STRIPE_SECRET, PG_SECRET, "Zq9SECRETstripe", "hunter2"] {
            assert!(!text.contains(secret), "{what} shows a secret ({secret})");
        }
    }
}
