//! A schema registry double that follows the Confluent Schema Registry REST API for what
//! paystream uses: schemas by id, subject lookup and registration, the registry's error bodies
//! (`{"error_code": 40403, "message": …}`), optional basic auth, and switches to answer 503 or
//! count requests. There is no Java here, so no real registry; the daemon talks to this one
//! over HTTP like to the real one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};

#[derive(Default)]
struct Inner {
    /// id → schema text.
    schemas: Vec<String>,
    /// subject → ids of its versions.
    subjects: HashMap<String, Vec<u32>>,
    unavailable: bool,
    /// `Basic …` header value required, if any.
    auth: Option<String>,
    /// Requests by path.
    requests: HashMap<String, u32>,
}

#[derive(Clone)]
pub struct RegistryDouble {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

fn same_schema(a: &str, b: &str) -> bool {
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(a).unwrap(),
        serde_json::from_str(b).unwrap(),
    );
    a == b
}

impl RegistryDouble {
    /// Starts on a free loopback port, on the current tokio runtime.
    pub async fn start() -> RegistryDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner::default()));
        let state = inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        RegistryDouble { url, inner }
    }

    /// Registers `schema` under `subject` as a producer would; returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        register(&mut self.inner.lock().unwrap(), subject, schema)
    }

    pub fn set_unavailable(&self, on: bool) {
        self.inner.lock().unwrap().unavailable = on;
    }

    pub fn require_basic_auth(&self, user_password: &str) {
        use base64::Engine;
        self.inner.lock().unwrap().auth = Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        ));
    }

    /// How many requests reached `path`.
    pub fn requests(&self, path: &str) -> u32 {
        *self.inner.lock().unwrap().requests.get(path).unwrap_or(&0)
    }

    /// The schema registered under `subject`'s latest version.
    pub fn latest(&self, subject: &str) -> Option<(u32, String)> {
        let i = self.inner.lock().unwrap();
        let id = *i.subjects.get(subject)?.last()?;
        Some((id, i.schemas[id as usize - 1].clone()))
    }
}

fn register(i: &mut Inner, subject: &str, schema: &str) -> u32 {
    let id = match i.schemas.iter().position(|s| same_schema(s, schema)) {
        Some(p) => p as u32 + 1,
        None => {
            i.schemas.push(schema.to_string());
            i.schemas.len() as u32
        }
    };
    let versions = i.subjects.entry(subject.to_string()).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    id
}

fn reply(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn error(status: u16, code: u32, message: String) -> Response<Full<Bytes>> {
    reply(
        status,
        serde_json::json!({"error_code": code, "message": message}),
    )
}

async fn handle(
    state: &Arc<Mutex<Inner>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut i = state.lock().unwrap();
    *i.requests.entry(path.clone()).or_default() += 1;
    if i.unavailable {
        return error(503, 50003, "the registry double is switched off".into());
    }
    if i.auth.is_some() && i.auth != auth {
        return error(401, 401, "Unauthorized".into());
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let schema_of = |body: &Bytes| -> Option<String> {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()?
            .get("schema")?
            .as_str()
            .map(str::to_string)
    };
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["schemas", "ids", id]) => match id.parse::<usize>() {
            Ok(n) if n >= 1 && n <= i.schemas.len() => {
                reply(200, serde_json::json!({"schema": i.schemas[n - 1]}))
            }
            _ => error(404, 40403, format!("Schema {id} not found")),
        },
        // Lookup: is this schema registered under the subject?
        ("POST", ["subjects", subject]) => {
            let Some(schema) = schema_of(&body) else {
                return error(422, 42201, "Invalid schema".into());
            };
            let Some(ids) = i.subjects.get(*subject) else {
                return error(404, 40401, format!("Subject '{subject}' not found."));
            };
            match ids
                .iter()
                .enumerate()
                .find(|(_, id)| same_schema(&i.schemas[**id as usize - 1], &schema))
            {
                Some((v, id)) => reply(
                    200,
                    serde_json::json!({"subject": subject, "id": id, "version": v + 1, "schema": schema}),
                ),
                None => error(404, 40403, "Schema not found".into()),
            }
        }
        ("POST", ["subjects", subject, "versions"]) => match schema_of(&body) {
            Some(schema) => {
                let id = register(&mut i, subject, &schema);
                reply(200, serde_json::json!({"id": id}))
            }
            None => error(422, 42201, "Invalid schema".into()),
        },
        _ => error(404, 404, format!("no route {method} {path}")),
    }
}
