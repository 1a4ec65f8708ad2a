//! A Confluent Schema Registry client: writer schemas by id (for reading Avro) and the
//! registration of paystream's own status schema (for writing it).
//!
//! Schemas by id are immutable, so each id is fetched once and kept for the life of the process.
//! A fetch is retried a bounded number of times with backoff; then the caller gets the error and
//! sends the message to the dead letters (see the policy in [`crate::source`]). A missing id
//! (404, `error_code` 40403) is not retried: the registry answered, and the answer is final.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::avro::WriterSchema;
use crate::secret::Secret;

/// A registry failure. `NotFound` and `Invalid` are the producer's or operator's fault and a
/// retry cannot help; `Unavailable` is the registry's and a later retry may.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("schema id {id} is not in the registry at {url}")]
    NotFound { id: u32, url: String },
    #[error("schema registry at {url} unavailable after {attempts} attempt(s): {detail}")]
    Unavailable {
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("schema registry at {url} answered {what}: {detail}")]
    Invalid {
        url: String,
        what: String,
        detail: String,
    },
}

impl RegistryError {
    /// Only an unreachable or failing registry may answer later; an unknown id or an answer
    /// that does not fit will not change by asking again.
    pub fn retryable(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub url: String,
    /// `user:password` for HTTP basic auth.
    pub auth: Option<Secret>,
    pub timeout: Duration,
    /// Attempts per request (at least 1).
    pub attempts: u32,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

pub struct Registry {
    settings: RegistrySettings,
    base: String,
    auth_header: Option<String>,
    client: Client<Https, Full<Bytes>>,
    by_id: Mutex<HashMap<u32, Arc<WriterSchema>>>,
}

/// One HTTP answer.
struct Reply {
    status: u16,
    body: serde_json::Value,
}

impl Registry {
    pub fn new(settings: RegistrySettings) -> Registry {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .expect("ring supports the default protocol versions")
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        let auth_header = settings.auth.as_ref().map(|a| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(a.expose())
            )
        });
        Registry {
            base: settings.url.trim_end_matches('/').to_string(),
            settings,
            auth_header,
            client,
            by_id: Mutex::new(HashMap::new()),
        }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// The writer schema with registry id `id`: from the cache, or fetched once.
    pub async fn schema(&self, id: u32) -> Result<Arc<WriterSchema>, RegistryError> {
        if let Some(s) = self.by_id.lock().expect("registry cache").get(&id) {
            return Ok(s.clone());
        }
        // Two tasks may fetch the same new id at once; both get the same immutable schema.
        let r = self
            .request("GET", &format!("/schemas/ids/{id}"), None)
            .await?;
        if r.status == 404 {
            return Err(RegistryError::NotFound {
                id,
                url: self.base.clone(),
            });
        }
        let text = match (r.status, r.body.get("schema").and_then(|s| s.as_str())) {
            (200, Some(t)) => t.to_string(),
            _ => return Err(self.invalid(&format!("schema id {id}"), &r)),
        };
        // Only Avro: a JSON Schema or Protobuf id says `schemaType`, and is not ours to read.
        if let Some(t) = r.body.get("schemaType").and_then(|t| t.as_str()) {
            if t != "AVRO" {
                return Err(RegistryError::Invalid {
                    url: self.base.clone(),
                    what: format!("schema id {id}"),
                    detail: format!("schemaType {t}, not AVRO"),
                });
            }
        }
        let schema = Arc::new(
            WriterSchema::parse(&text).map_err(|e| RegistryError::Invalid {
                url: self.base.clone(),
                what: format!("schema id {id}"),
                detail: format!("not a readable Avro schema: {e}"),
            })?,
        );
        tracing::info!(schema_id = id, registry = %self.base, "schema fetched from the registry");
        self.by_id
            .lock()
            .expect("registry cache")
            .insert(id, schema.clone());
        Ok(schema)
    }

    /// The id of `schema` under `subject`: looked up if registered, registered otherwise
    /// (the registry returns the existing id for an identical schema either way).
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let body = serde_json::json!({ "schema": schema }).to_string();
        let lookup = self
            .request("POST", &format!("/subjects/{subject}"), Some(&body))
            .await?;
        let r = if lookup.status == 200 {
            lookup
        } else {
            self.request(
                "POST",
                &format!("/subjects/{subject}/versions"),
                Some(&body),
            )
            .await?
        };
        match (r.status, r.body.get("id").and_then(|i| i.as_u64())) {
            (200, Some(id)) => u32::try_from(id).map_err(|_| self.invalid(subject, &r)),
            _ => Err(self.invalid(&format!("registering subject {subject}"), &r)),
        }
    }

    fn invalid(&self, what: &str, r: &Reply) -> RegistryError {
        RegistryError::Invalid {
            url: self.base.clone(),
            what: format!("{what} with HTTP {}", r.status),
            detail: r.body.to_string(),
        }
    }

    /// One request with bounded retries: connection errors, timeouts, 429 and 5xx are retried
    /// (doubling from 100 ms); any other answer is returned as it is.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Reply, RegistryError> {
        let attempts = self.settings.attempts.max(1);
        let mut backoff =
            crate::clock::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last = String::new();
        for attempt in 1..=attempts {
            match self.once(method, path, body).await {
                Ok(r) if r.status == 429 || r.status >= 500 => {
                    last = format!("HTTP {}: {}", r.status, r.body)
                }
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
            crate::metrics::METRICS.schema_registry_errors.inc();
            tracing::warn!(registry = %self.base, path, attempt, error = %last, "schema registry request failed");
            if attempt < attempts {
                backoff.sleep().await;
            }
        }
        Err(RegistryError::Unavailable {
            url: self.base.clone(),
            attempts,
            detail: last,
        })
    }

    async fn once(&self, method: &str, path: &str, body: Option<&str>) -> Result<Reply, String> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("accept", "application/vnd.schemaregistry.v1+json")
            .header("content-type", "application/vnd.schemaregistry.v1+json");
        if let Some(a) = &self.auth_header {
            req = req.header("authorization", a);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            // Error bodies are JSON too ({"error_code": 40403, "message": …}); anything else is
            // kept as text for the error message.
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            });
            Ok(Reply { status, body })
        };
        tokio::time::timeout(self.settings.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:?}", self.settings.timeout))?
    }
}
