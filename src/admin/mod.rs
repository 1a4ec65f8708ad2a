//! The admin HTTP endpoint, on `--metrics-addr`: `/metrics` (Prometheus text), `/healthz` (the
//! process answers), `/readyz` (a readiness check supplied by the command), and for the daemon
//! the state API that `paystream state …` reads while the daemon holds the store (sled allows
//! one process per data dir):
//!
//! - `GET /state/info`: `{"data_dir": …}`, so the CLI knows it asks the daemon that owns its dir;
//! - `GET /state/stats`, `GET /state/list?…` ([`ListQuery`]), `GET /state/get?q=…`: JSON;
//! - `GET /state/export`: every entry as JSON lines, streamed.
//!
//! The state API shows payment ids, keys and amounts (never secrets): keep the address on a
//! private interface, as the default `127.0.0.1` does.

pub mod cli;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::clock::Clock;
use crate::state::inspect::{self, ListQuery};
use crate::state::{StateError, Store};

/// Returns `Ok(())` when ready, or the reason it is not.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

type Body = BoxBody<Bytes, Infallible>;

/// What the state API reads: the daemon's open store and the settings its answers depend on.
pub struct StateApi {
    pub store: Arc<Store>,
    /// Canonical path of the data dir.
    pub data_dir: PathBuf,
    pub poll_interval: Duration,
    /// The daemon's `--stale-after`, for `state stats`.
    pub stale_after: Duration,
    pub pending_status: String,
    pub clock: Clock,
}

/// `GET /state/info`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Info {
    pub data_dir: PathBuf,
}

/// Lines per chunk of a streamed export.
const EXPORT_CHUNK: usize = 512;
/// Header of `/state/export`: how many entries the last checkpoint held (for progress only).
pub const ENTRIES_HEADER: &str = "x-paystream-entries";

fn reply(code: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(body.into()).boxed())
        .expect("response")
}

fn json<T: Serialize>(r: Result<T, StateError>) -> Response<Body> {
    match r {
        Ok(v) => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&v).expect("serializes"),
        ),
        // The counts are known once the recovery check beside the start passed: ask again.
        Err(e @ StateError::Unchecked { .. }) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("{e}\n"),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

/// Binds `addr` (fails at start, naming the address, if it cannot) and serves in the background.
pub async fn serve(
    addr: SocketAddr,
    ready: ReadyCheck,
    state: Option<Arc<StateApi>>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("--metrics-addr {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (ready, state) = (ready.clone(), state.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (ready, state) = (ready.clone(), state.clone());
                    async move { Ok::<_, Infallible>(route(&req, &ready, state).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}

async fn route<B>(
    req: &Request<B>,
    ready: &ReadyCheck,
    state: Option<Arc<StateApi>>,
) -> Response<Body> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("").to_string();
    match (path, state) {
        ("/metrics", _) => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::render(),
        ),
        ("/healthz", _) => reply(StatusCode::OK, "text/plain", "ok\n"),
        ("/readyz", _) => match ready() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        ("/state/info", Some(api)) => json(Ok(Info {
            data_dir: api.data_dir.clone(),
        })),
        ("/state/export", Some(api)) => export(api),
        (p, Some(api)) if p.starts_with("/state/") => {
            let p = p.to_string();
            // Scans read sled: off the async workers.
            let r = tokio::task::spawn_blocking(move || state_query(&api, &p, &query)).await;
            r.unwrap_or_else(|e| {
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                )
            })
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

fn state_query(api: &StateApi, path: &str, query: &str) -> Response<Body> {
    let now = api.clock.now_ms();
    match path {
        "/state/stats" => json(inspect::stats(
            &api.store,
            &api.data_dir,
            now,
            api.poll_interval,
            api.stale_after,
        )),
        "/state/list" => match ListQuery::from_query(query) {
            Ok(q) => json(inspect::list(&api.store, &q, now, &api.pending_status)),
            Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        },
        "/state/get" => {
            let q = inspect::query_pairs(query)
                .into_iter()
                .find(|(k, _)| k == "q")
                .map(|(_, v)| v)
                .unwrap_or_default();
            json(inspect::find(&api.store, &q, &api.pending_status))
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Streams every entry as a JSON line, in chunks, from a blocking scan; stops scanning when the
/// client goes away.
fn export(api: Arc<StateApi>) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let total = api.store.entry_count();
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let mut lines = 0;
        let r = api.store.scan(|e| {
            serde_json::to_writer(&mut buf, &e).expect("entry serializes");
            buf.push(b'\n');
            lines += 1;
            if lines % EXPORT_CHUNK == 0 {
                return tx
                    .blocking_send(Bytes::from(std::mem::take(&mut buf)))
                    .is_ok();
            }
            true
        });
        match r {
            Ok(()) => {
                let _ = tx.blocking_send(Bytes::from(buf));
            }
            // The status line is gone; a line the CLI cannot parse marks the export as broken.
            Err(e) => {
                tracing::error!(error = %e, "state export failed");
                let _ = tx.blocking_send(Bytes::from(format!("export failed: {e}\n")));
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .header(ENTRIES_HEADER, total.to_string())
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}
