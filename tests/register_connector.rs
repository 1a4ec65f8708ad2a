//! `scripts/register-connector` against a real Kafka Connect 3.9 worker running Debezium
//! 3.6.3's PostgreSQL connector (distributed mode, on the dev broker and the dev Postgres:
//! `scripts/connect-up`): create, an idempotent re-run, an update the task really restarts
//! with, `--status`, validation errors Connect and Postgres really give (a wrong password, an
//! unreachable database), a task that fails at start (a table that does not exist), a plugin
//! that is not installed, delete. A fake Connect stays for the one thing the real one cannot be
//! made to do on demand: answer 409 while its workers rebalance.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use common::output;

const PG_CLASS: &str = "io.debezium.connector.postgresql.PostgresConnector";

// ---------- the real worker ----------

/// The worker of scripts/connect-up (started once per test binary).
fn connect_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        common::stack();
        common::script("connect-up");
        format!(
            "http://127.0.0.1:{}",
            std::env::var("PAYSTREAM_CONNECT_PORT").unwrap_or_else(|_| "28083".into())
        )
    })
}

/// The tests that use the real worker take turns: there is one worker, and each registration
/// rebalances it.
async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    static WORKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    WORKER.lock().await
}

/// A connector of the test's own: its name, slot, publication and topic prefix.
struct Registration {
    name: String,
}

impl Registration {
    fn new(prefix: &str) -> Registration {
        Registration {
            name: common::unique(prefix),
        }
    }

    /// The script, with the environment connectors/payments.json names.
    fn script(&self, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
        let mut c = script();
        c.args(["--connect-url", connect_url(), "--timeout", "90"])
            .args(args)
            .env("CONNECTOR_NAME", &self.name)
            .env("SLOT_NAME", &self.name)
            .env("PUBLICATION_NAME", &self.name)
            .env("TOPIC_PREFIX", &self.name)
            .env("POSTGRES_HOST", "127.0.0.1")
            .env(
                "POSTGRES_PORT",
                std::env::var("PAYSTREAM_PG_PORT").unwrap_or_else(|_| "25432".into()),
            )
            .env("DEBEZIUM_USER", "postgres")
            .env("DEBEZIUM_PASSWORD", "s3cret-debezium");
        for (k, v) in env {
            c.env(k, v);
        }
        output(&mut c)
    }

    fn get(&self, path: &str) -> Value {
        let out = Command::new("curl")
            .args(["-sS", &format!("{}{path}", connect_url())])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Removes the connector, then its slot and publication (Debezium leaves both).
    async fn drop_all(&self) {
        let _ = self.script(&[], &["--delete"]);
        let db = common::pg(&common::stack().pg_url).await;
        common::drop_slot(&db, &self.name).await;
        let _ = db
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS \"{}\"", self.name))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registers_updates_and_deletes_on_real_connect() {
    let _turn = turn().await;
    let r = Registration::new("regok");
    let (code, out, err) = r.script(&[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("created connector {}", r.name)),
        "{out}"
    );
    assert!(out.contains("task 0: RUNNING"), "{out}");
    assert!(!out.contains("s3cret") && !err.contains("s3cret"));
    let config = r.get(&format!("/connectors/{}/config", r.name));
    // The environment's values, and the defaults for what it leaves unset.
    assert_eq!(config["topic.prefix"], r.name.as_str());
    assert_eq!(config["plugin.name"], "pgoutput");
    assert_eq!(config["heartbeat.interval.ms"], "10000");
    // Debezium really runs: its replication slot exists.
    let offsets = r.get(&format!("/connectors/{}/status", r.name));
    assert_eq!(offsets["connector"]["state"], "RUNNING", "{offsets}");

    // Run again: the same connector, updated in place, not duplicated.
    let (code, out, err) = r.script(&[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("updated connector {}", r.name)),
        "{out}"
    );
    // A changed setting: the script returns once the task runs it.
    let (code, out, err) = r.script(&[("HEARTBEAT_INTERVAL_MS", "5000")], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let tasks = r.get(&format!("/connectors/{}/tasks", r.name));
    assert_eq!(
        tasks[0]["config"]["heartbeat.interval.ms"], "5000",
        "{tasks}"
    );

    let (code, out, _) = r.script(&[], &["--status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("connector {}: RUNNING", r.name)),
        "{out}"
    );
    let (code, out, err) = r.script(&[], &["--delete"]);
    assert_eq!(code, 0, "{out}{err}");
    // The message names the real slot and publication.
    assert!(
        out.contains(&format!("pg_drop_replication_slot('{}')", r.name))
            && out.contains(&format!("DROP PUBLICATION {};", r.name)),
        "{out}"
    );
    let (code, _, err) = r.script(&[], &["--status"]);
    assert_eq!(code, 8, "{err}");
    r.drop_all().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn real_connect_refusals_each_have_their_code_and_cause() {
    // A wrong password: Postgres refuses it during Connect's validation; nothing registered.
    let _turn = turn().await;
    let r = Registration::new("regpw");
    let (code, _, err) = r.script(
        &[
            ("DEBEZIUM_USER", "debezium"),
            ("DEBEZIUM_PASSWORD", "wrong"),
        ],
        &[],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    assert_eq!(r.get(&format!("/connectors/{}", r.name))["error_code"], 404);

    // Nothing listens where the database should be.
    let (code, _, err) = r.script(&[("POSTGRES_PORT", "1")], &[]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("database.hostname"), "{err}");

    // A table that does not exist passes validation; the task fails at start, and its trace
    // says why.
    let missing = Registration::new("regtable");
    let cfg = tempfile::NamedTempFile::new().unwrap();
    let mut doc: Value = common::connector_doc();
    doc["config"]["table.include.list"] = json!(format!("public.{}", missing.name));
    std::fs::write(cfg.path(), doc.to_string()).unwrap();
    let (code, out, err) = missing.script(&[], &["--config", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(out.contains("task 0: FAILED"), "{out}");
    assert!(err.contains("No table filters found"), "{err}");
    // The cause fixed, a re-run restarts the task that failed on this same config (an update
    // alone would not: Connect restarts tasks only when their config changes).
    let db = common::pg(&common::stack().pg_url).await;
    common::create_payments_table(&db, &missing.name).await;
    let (code, out, err) = missing.script(&[], &["--config", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("restarting the FAILED task"), "{out}");
    assert!(out.contains("task 0: RUNNING"), "{out}");
    missing.drop_all().await;
    db.batch_execute(&format!("DROP TABLE {}", missing.name))
        .await
        .unwrap();

    // A connector class the worker does not have.
    doc["config"]["connector.class"] = json!("io.debezium.connector.mysql.MySqlConnector");
    std::fs::write(cfg.path(), doc.to_string()).unwrap();
    let (code, _, err) = r.script(&[], &["--config", cfg.path().to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("is not installed") && err.contains(PG_CLASS),
        "{err}"
    );
}

#[test]
fn an_absent_connect_or_a_missing_variable_fail_with_their_own_codes() {
    // Nothing listens: bounded wait, then exit 2.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = std::time::Instant::now();
    let (code, _, err) = output(
        script()
            .args([
                "--connect-url",
                &format!("http://{nobody}"),
                "--timeout",
                "2",
            ])
            .env("DEBEZIUM_PASSWORD", "x"),
    );
    assert_eq!(code, 2);
    assert!(err.contains("did not answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // A dry run needs no Connect; it masks the password and names a missing variable.
    let (code, out, _) = output(
        script()
            .args(["--dry-run", "--avro"])
            .env("DEBEZIUM_PASSWORD", "s3cret-debezium"),
    );
    assert_eq!(code, 0);
    let cfg: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cfg["config"]["database.password"], "****");
    assert_eq!(
        cfg["config"]["value.converter"],
        "io.confluent.connect.avro.AvroConverter"
    );
    assert!(cfg["config"]
        .get("value.converter.schemas.enable")
        .is_none());
    let (code, _, err) = output(script().arg("--dry-run").env_remove("DEBEZIUM_PASSWORD"));
    assert_eq!(code, 1);
    assert!(err.contains("DEBEZIUM_PASSWORD"), "{err}");
}

// ---------- the fake, for a 409 during a rebalance ----------

/// How the fake behaves: 409s answered to PUT config before it succeeds.
#[derive(Clone, Copy)]
struct Scenario {
    conflicts: usize,
}

#[derive(Default)]
struct Fake {
    exists: bool,
    conflicts_left: usize,
    /// The config the connector's task runs (what the last PUT sent).
    config: Value,
    /// Every request: (method, path, body).
    log: Vec<(String, String, Value)>,
}

fn reply(code: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn error(code: u16, message: &str) -> Response<Full<Bytes>> {
    reply(code, json!({"error_code": code, "message": message}))
}

fn handle(f: &mut Fake, method: &str, path: &str, body: &Value) -> Response<Full<Bytes>> {
    let name = "payments-connector";
    match (method, path) {
        ("GET", "/") => reply(
            200,
            json!({"version": "3.9.0", "commit": "fake", "kafka_cluster_id": "fake"}),
        ),
        ("GET", "/connector-plugins") => reply(
            200,
            json!([{"class": PG_CLASS, "type": "source", "version": "3.6.3.Final"}]),
        ),
        // As real Connect: `name` is required in a validated config.
        ("PUT", p) if p.ends_with("/config/validate") => {
            let errors: Vec<Value> = if body.get("name").is_some() {
                vec![]
            } else {
                vec![
                    json!({"definition": {"name": "name"}, "value": {"name": "name", "errors": ["Missing required configuration \"name\" which has no default value."]}}),
                ]
            };
            reply(
                200,
                json!({"name": PG_CLASS, "error_count": errors.len(), "groups": [], "configs": errors}),
            )
        }
        ("PUT", p) if p == format!("/connectors/{name}/config") => {
            if f.conflicts_left > 0 {
                f.conflicts_left -= 1;
                return error(409, "Cannot complete request momentarily due to stale configuration (typically caused by a concurrent config change)");
            }
            let code = if f.exists { 200 } else { 201 };
            f.exists = true;
            f.config = body.clone();
            reply(
                code,
                json!({"name": name, "config": body, "tasks": [], "type": "source"}),
            )
        }
        ("GET", p) if p == format!("/connectors/{name}/status") => reply(
            200,
            json!({"name": name, "connector": {"state": "RUNNING", "worker_id": "connect:8083"},
                   "tasks": [{"id": 0, "state": "RUNNING", "worker_id": "connect:8083"}], "type": "source"}),
        ),
        ("GET", p) if p == format!("/connectors/{name}/tasks") => reply(
            200,
            json!([{"id": {"connector": name, "task": 0}, "config": f.config}]),
        ),
        _ => error(404, "HTTP 404 Not Found"),
    }
}

/// Starts the fake on a free port (after `starts_after`); returns its address and request log.
fn start(sc: Scenario) -> (SocketAddr, Arc<Mutex<Fake>>) {
    let state = Arc::new(Mutex::new(Fake {
        conflicts_left: sc.conflicts,
        ..Fake::default()
    }));
    // Below the ephemeral range (see `common::free_port`): a port from `bind(:0)`, released
    // until the fake starts, can be taken by an outgoing connection meanwhile (seen in CI).
    // Bound here, before the address is handed out, so nothing can take it meanwhile.
    let std_listener = loop {
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", common::free_port())) {
            break l;
        }
    };
    let addr = std_listener.local_addr().unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let st = state.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let st = st.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let st = st.clone();
                            async move {
                                let method = req.method().to_string();
                                let path = req.uri().path().to_string();
                                let raw = req.into_body().collect().await.unwrap().to_bytes();
                                let body: Value =
                                    serde_json::from_slice(&raw).unwrap_or(Value::Null);
                                let mut f = st.lock().unwrap();
                                f.log.push((method.clone(), path.clone(), body.clone()));
                                Ok::<_, Infallible>(handle(&mut f, &method, &path, &body))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    (addr, state)
}

fn script() -> Command {
    let mut c = Command::new(common::root().join("scripts/register-connector"));
    c.env_remove("CONNECT_URL");
    c
}

/// Runs the script against `addr` with a password and a topic prefix in its environment.
fn register(addr: SocketAddr, args: &[&str]) -> (i32, String, String) {
    output(
        script()
            .args([
                "--connect-url",
                &format!("http://{addr}"),
                "--timeout",
                "10",
                "--settle",
                "0",
            ])
            .args(args)
            .env("DEBEZIUM_PASSWORD", "s3cret-debezium")
            .env("TOPIC_PREFIX", "shop"),
    )
}

fn puts(f: &Mutex<Fake>) -> Vec<Value> {
    f.lock()
        .unwrap()
        .log
        .iter()
        .filter(|(m, p, _)| m == "PUT" && p.ends_with("/config"))
        .map(|(_, _, b)| b.clone())
        .collect()
}

#[test]
fn a_rebalance_conflict_is_retried_a_bounded_number_of_times() {
    let (addr, fake) = start(Scenario { conflicts: 2 });
    let (code, out, err) = register(addr, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(err.matches("rebalancing (409)").count(), 2, "{err}");
    assert_eq!(puts(&fake).len(), 3);

    let (addr, _) = start(Scenario { conflicts: 100 });
    let (code, _, err) = register(addr, &[]);
    assert_eq!(code, 7, "{err}");
    assert!(
        err.contains("HTTP 409") && err.contains("error_code 409"),
        "{err}"
    );
}
