//! paystream processes: their arguments, spawning, logs, metrics and waiting on them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::*;

/// A test's own topics, so tests sharing the broker never see each other's records.
#[derive(Clone)]
pub struct Topics {
    pub run: String,
    pub cdc: String,
    pub status: String,
    pub dlq: String,
    /// The payments table whose changes reach `cdc`: the test's own under real Debezium
    /// ([`cdc_topics`]), `payments` for hand-made events.
    pub table: String,
}

pub async fn topics(s: &Stack, prefix: &str, cdc_partitions: i32) -> Topics {
    let run = unique(prefix);
    let t = Topics {
        cdc: format!("{run}.public.payments"),
        status: format!("{run}-status"),
        dlq: format!("{run}-dlq"),
        run,
        table: "payments".into(),
    };
    create_topics(
        &s.brokers,
        &[(&t.cdc, cdc_partitions), (&t.status, 1), (&t.dlq, 1)],
    )
    .await;
    t
}

/// `paystream run` arguments for a test: short intervals, the stack's servers, then `extra`
/// (flag/value pairs, replacing a default flag of the same name).
pub fn run_args(
    s: &Stack,
    t: &Topics,
    data_dir: &Path,
    metrics_port: u16,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--brokers",
        &s.brokers,
        "--cdc-topic",
        &t.cdc,
        "--status-topic",
        &t.status,
        "--dlq-topic",
        &t.dlq,
        "--group-id",
        &t.run,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(daemon_args(s, data_dir, metrics_port));
    with_extra(&mut args, extra);
    args
}

/// What every test daemon runs with, whatever its source: its data dir and admin port, short
/// intervals, the emulator and a test key.
pub fn daemon_args(s: &Stack, data_dir: &Path, metrics_port: u16) -> Vec<String> {
    [
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--poll-interval",
        "1s",
        "--checkpoint-interval",
        "200ms",
        "--stripe-api-base",
        &s.stripe,
        "--stripe-key",
        "sk_test_paystream",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// A loopback port free right now (for --metrics-addr), picked at random below Linux's
/// ephemeral range (32768 and up). A port the kernel hands out (`bind :0`) can be taken by any
/// outgoing connection (librdkafka opens many) before the daemon binds it; CI saw exactly that.
/// 20000-24999 also stays clear of the dev stack's ports.
pub fn free_port() -> u16 {
    use rand::Rng;
    loop {
        let p = rand::thread_rng().gen_range(20_000..25_000);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// [`sample`] of one fresh scrape of `port` (0 when nothing answers).
pub fn metric(port: u16, name: &str, parts: &[&str]) -> f64 {
    sample(&scrape(port), name, parts)
}

/// One scrape of /metrics, so several values can be read from the same instant.
pub fn scrape(port: u16) -> String {
    http_get(port, "/metrics").map(|r| r.1).unwrap_or_default()
}

/// Sum of the samples of exactly `name` (not of metrics whose names merely start with it) in a
/// scrape, over the lines containing every one of `parts` (e.g. `outcome="failed"`).
pub fn sample(text: &str, name: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && parts.iter().all(|p| l.contains(p))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs a command to its end: (exit code, stdout, stderr), the output as text.
pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub struct Proc(pub Child);

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    /// SIGTERM, then wait for a clean exit (final checkpoint).
    pub fn term(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            if std::time::Instant::now() > deadline {
                self.kill9();
                panic!("paystream did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn<A: AsRef<std::ffi::OsStr>>(args: &[A], log: &Path) -> Proc {
    spawn_logging(
        args,
        log,
        "info,paystream=debug,stripe=error,tokio_cron_scheduler=warn",
    )
}

/// [`spawn`] with its own `RUST_LOG` filter.
pub fn spawn_logging<A: AsRef<std::ffi::OsStr>>(args: &[A], log: &Path, filter: &str) -> Proc {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .args(args)
        .env("RUST_LOG", filter)
        .env("PAYSTREAM_KAFKA_OPTIONS", KAFKA_TEST_OPTIONS)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("spawn paystream");
    Proc(child)
}

/// Polls `f` every 250 ms until it is true; panics naming `what` after `secs`.
pub async fn wait_for<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out after {secs}s waiting for {what}");
}

/// GET on loopback without a client library: (status code, body). `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// `paystream updater` arguments for a test: the stack's Postgres, then `extra`.
pub fn updater_args(s: &Stack, status_topic: &str, group: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "updater",
        "--brokers",
        &s.brokers,
        "--status-topic",
        status_topic,
        "--group-id",
        group,
        "--postgres-url",
        &s.pg_url,
        "--metrics-addr",
        "127.0.0.1:0",
        "--batch-linger",
        "50ms",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    with_extra(&mut args, extra);
    args
}

/// Appends flag/value pairs, each replacing a default flag of the same name (clap rejects a
/// flag given twice).
pub fn with_extra(args: &mut Vec<String>, extra: &[&str]) {
    for pair in extra.chunks(2) {
        if let Some(i) = args.iter().position(|a| a == pair[0]) {
            args.drain(i..i + 2);
        }
    }
    args.extend(extra.iter().map(|a| a.to_string()));
}

/// A test's knob from the environment (the `--long` forms of scripts set them).
pub fn knob(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Panics if any log in `dir` shows a panic.
pub fn assert_no_panic(dir: &Path) {
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        assert!(
            !text.contains("panicked"),
            "{} shows a panic:\n{}",
            p.display(),
            text.lines()
                .filter(|l| l.contains("panicked"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        // A log file is not a terminal: no colour codes (they break every grep on the logs).
        assert!(
            !text.contains('\u{1b}'),
            "{} holds ANSI escape codes",
            p.display()
        );
    }
}

/// A directory for a test's logs that outlives the test (under target/, ignored by git), so a
/// failure in CI can be read afterwards.
pub fn log_dir(name: &str) -> PathBuf {
    let d = root().join("target/test-logs").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}
