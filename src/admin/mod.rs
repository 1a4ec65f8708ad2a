//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (a readiness check supplied by the command).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Returns `Ok(())` when ready, or the reason it is not.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

/// Binds `addr` (fails at start, naming the address, if it cannot) and serves in the background.
pub async fn serve(addr: SocketAddr, ready: ReadyCheck) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("--metrics-addr {addr}: {e}")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let ready = ready.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let ready = ready.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(match req.uri().path() {
                            "/metrics" => reply(
                                StatusCode::OK,
                                "text/plain; version=0.0.4",
                                crate::metrics::render(),
                            ),
                            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
                            "/readyz" => match ready() {
                                Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
                                Err(why) => reply(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "text/plain",
                                    format!("not ready: {why}\n"),
                                ),
                            },
                            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(bound)
}
