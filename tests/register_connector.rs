//! `scripts/register-connector` against a fake Kafka Connect REST server that answers as the
//! real one does (status codes, `error_code`/`message` bodies, connector and task states): a
//! first registration, an update, a rebalance 409, an invalid config, a FAILED task, a missing
//! plugin, an unreachable Connect, and `--status` / `--delete` / `--dry-run`.

mod common;

use std::collections::VecDeque;
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

/// How the fake behaves.
#[derive(Clone)]
struct Scenario {
    plugins: Vec<&'static str>,
    /// (field, error) pairs the validate endpoint reports.
    invalid: Vec<(&'static str, &'static str)>,
    /// 409s answered to PUT config before it succeeds.
    conflicts: usize,
    /// The connector exists already (PUT answers 200, not 201).
    exists: bool,
    /// Task states the status endpoint walks through, one per GET; the last one stays.
    /// A state with a trace is FAILED.
    tasks: Vec<(&'static str, Option<&'static str>)>,
    /// Seconds before the server starts listening (Connect still starting).
    starts_after: f64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            plugins: vec![
                PG_CLASS,
                "org.apache.kafka.connect.mirror.MirrorSourceConnector",
            ],
            invalid: vec![],
            conflicts: 0,
            exists: false,
            tasks: vec![("UNASSIGNED", None), ("RUNNING", None)],
            starts_after: 0.0,
        }
    }
}

#[derive(Default)]
struct Fake {
    exists: bool,
    conflicts_left: usize,
    tasks: VecDeque<(&'static str, Option<&'static str>)>,
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

fn handle(
    sc: &Scenario,
    f: &mut Fake,
    method: &str,
    path: &str,
    body: &Value,
) -> Response<Full<Bytes>> {
    let name = "payments-connector";
    match (method, path) {
        ("GET", "/") => reply(
            200,
            json!({"version": "3.9.0", "commit": "fake", "kafka_cluster_id": "fake"}),
        ),
        ("GET", "/connector-plugins") => reply(
            200,
            Value::Array(
                sc.plugins
                    .iter()
                    .map(|c| json!({"class": c, "type": "source", "version": "3.0.0.Final"}))
                    .collect(),
            ),
        ),
        ("PUT", p) if p.ends_with("/config/validate") => {
            if body["connector.class"].as_str() != Some(PG_CLASS) {
                return error(400, "Connector config {} contains no connector type");
            }
            let configs: Vec<Value> = sc
                .invalid
                .iter()
                .map(|(k, e)| json!({"definition": {"name": k}, "value": {"name": k, "value": body[*k], "errors": [e]}}))
                .collect();
            reply(
                200,
                json!({"name": PG_CLASS, "error_count": sc.invalid.len(), "groups": [], "configs": configs}),
            )
        }
        ("PUT", p) if p == format!("/connectors/{name}/config") => {
            if f.conflicts_left > 0 {
                f.conflicts_left -= 1;
                return error(409, "Cannot complete request momentarily due to stale configuration (typically caused by a concurrent config change)");
            }
            let code = if f.exists { 200 } else { 201 };
            f.exists = true;
            reply(
                code,
                json!({"name": name, "config": body, "tasks": [], "type": "source"}),
            )
        }
        ("GET", p) if p == format!("/connectors/{name}/status") => {
            if !f.exists {
                return error(404, &format!("No status found for connector {name}"));
            }
            let (state, trace) = if f.tasks.len() > 1 {
                f.tasks.pop_front().unwrap()
            } else {
                f.tasks[0]
            };
            let mut task = json!({"id": 0, "state": state, "worker_id": "connect:8083"});
            if let Some(t) = trace {
                task["state"] = json!("FAILED");
                task["trace"] = json!(t);
            }
            reply(
                200,
                json!({"name": name, "connector": {"state": "RUNNING", "worker_id": "connect:8083"}, "tasks": [task], "type": "source"}),
            )
        }
        ("DELETE", p) if p == format!("/connectors/{name}") => {
            if !f.exists {
                return error(404, &format!("Connector {name} not found"));
            }
            f.exists = false;
            Response::builder()
                .status(204)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
        _ => error(404, "HTTP 404 Not Found"),
    }
}

/// Starts the fake on a free port (after `starts_after`); returns its address and request log.
fn start(sc: Scenario) -> (SocketAddr, Arc<Mutex<Fake>>) {
    let state = Arc::new(Mutex::new(Fake {
        exists: sc.exists,
        conflicts_left: sc.conflicts,
        tasks: sc.tasks.iter().copied().collect(),
        log: vec![],
    }));
    // Below the ephemeral range (see `common::free_port`): a port from `bind(:0)`, released
    // until the fake starts, can be taken by an outgoing connection meanwhile (seen in CI).
    let addr: SocketAddr = ([127, 0, 0, 1], common::free_port()).into();
    let st = state.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(sc.starts_after));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (sc, st) = (sc.clone(), st.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (sc, st) = (sc.clone(), st.clone());
                            async move {
                                let method = req.method().to_string();
                                let path = req.uri().path().to_string();
                                let raw = req.into_body().collect().await.unwrap().to_bytes();
                                let body: Value =
                                    serde_json::from_slice(&raw).unwrap_or(Value::Null);
                                let mut f = st.lock().unwrap();
                                f.log.push((method.clone(), path.clone(), body.clone()));
                                Ok::<_, Infallible>(handle(&sc, &mut f, &method, &path, &body))
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
fn registers_then_updates_and_waits_for_running() {
    // Connect is still starting for a second: the script waits for it.
    let (addr, fake) = start(Scenario {
        starts_after: 1.0,
        ..Scenario::default()
    });
    let (code, out, err) = register(addr, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("created connector payments-connector"),
        "{out}"
    );
    assert!(out.contains("task 0: RUNNING"), "{out}");
    let sent = puts(&fake);
    assert_eq!(sent.len(), 1);
    // The environment's values, and the defaults for what it leaves unset.
    assert_eq!(sent[0]["database.password"], "s3cret-debezium");
    assert_eq!(sent[0]["topic.prefix"], "shop");
    assert_eq!(sent[0]["slot.name"], "paystream_payments");
    assert_eq!(sent[0]["plugin.name"], "pgoutput");
    assert_eq!(sent[0]["heartbeat.interval.ms"], "10000");
    assert!(!out.contains("s3cret") && !err.contains("s3cret"));

    // Run again: the same connector is updated, not duplicated.
    let (code, out, _) = register(addr, &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("updated connector payments-connector"),
        "{out}"
    );
}

#[test]
fn a_rebalance_conflict_is_retried_a_bounded_number_of_times() {
    let (addr, fake) = start(Scenario {
        conflicts: 2,
        ..Scenario::default()
    });
    let (code, out, err) = register(addr, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(err.matches("rebalancing (409)").count(), 2, "{err}");
    assert_eq!(puts(&fake).len(), 3);

    let (addr, _) = start(Scenario {
        conflicts: 100,
        ..Scenario::default()
    });
    let (code, _, err) = register(addr, &[]);
    assert_eq!(code, 7, "{err}");
    assert!(
        err.contains("HTTP 409") && err.contains("error_code 409"),
        "{err}"
    );
}

#[test]
fn an_invalid_config_prints_each_field_error_and_registers_nothing() {
    let (addr, fake) = start(Scenario {
        invalid: vec![
            ("database.hostname", "Unable to connect: Connection refused"),
            ("slot.name", "Slot name \"bad-name\" is invalid"),
        ],
        ..Scenario::default()
    });
    let (code, _, err) = register(addr, &[]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("database.hostname: Unable to connect"),
        "{err}"
    );
    assert!(err.contains("slot.name: Slot name"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
    assert!(puts(&fake).is_empty(), "nothing registered");
}

#[test]
fn a_failed_task_prints_its_trace() {
    let (addr, _) = start(Scenario {
        tasks: vec![
            ("UNASSIGNED", None),
            ("FAILED", Some("org.apache.kafka.connect.errors.ConnectException: ERROR: logical decoding requires wal_level >= logical")),
        ],
        ..Scenario::default()
    });
    let (code, out, err) = register(addr, &[]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(out.contains("task 0: FAILED"), "{out}");
    assert!(err.contains("wal_level >= logical"), "{err}");
}

#[test]
fn a_missing_plugin_or_an_absent_connect_fail_with_their_own_codes() {
    let (addr, fake) = start(Scenario {
        plugins: vec!["org.apache.kafka.connect.mirror.MirrorSourceConnector"],
        ..Scenario::default()
    });
    let (code, _, err) = register(addr, &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("is not installed") && err.contains("MirrorSourceConnector"),
        "{err}"
    );
    assert!(puts(&fake).is_empty());

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
}

#[test]
fn status_delete_and_dry_run() {
    let (addr, fake) = start(Scenario {
        exists: true,
        tasks: vec![("RUNNING", None)],
        ..Scenario::default()
    });
    let (code, out, _) = register(addr, &["--status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("connector payments-connector: RUNNING"),
        "{out}"
    );
    let (code, out, _) = register(addr, &["--delete"]);
    assert_eq!(code, 0);
    assert!(out.contains("replication slot"), "{out}");
    let (code, _, err) = register(addr, &["--status"]);
    assert_eq!(code, 8, "{err}");
    assert!(puts(&fake).is_empty(), "status and delete register nothing");

    // A dry run needs no Connect; it masks the password and names a missing variable.
    let (code, out, _) = register(addr, &["--dry-run", "--avro"]);
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
