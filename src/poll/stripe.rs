//! Stripe lookups through async-stripe, and the mapping of a PaymentIntent to a final answer.
//!
//! Requests are built with async-stripe's `RequestBuilder` and sent once
//! (`RequestStrategy::Once`): retries belong to the scheduler, which backs off per payment and
//! keeps the global rate budget, instead of a client sleeping inside a concurrency slot. The body
//! is read as untyped JSON and mapped onto [`IntentView`] with serde, so a parse error names the
//! field, and the emulator's answers (which the crate's full `PaymentIntent` type rejects) parse.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use stripe::{RequestStrategy, StripeError as ClientError};
use stripe_client_core::{RequestBuilder, StripeMethod};

/// What paystream writes back: only Stripe's final answers produce one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Succeeded,
    Failed,
}

impl FinalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Succeeded => "succeeded",
            FinalStatus::Failed => "failed",
        }
    }
}

/// The answer of one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Final {
        status: FinalStatus,
        stripe_status: String,
        reason: Option<String>,
        intent_id: String,
    },
    Pending {
        stripe_status: String,
    },
}

/// Why a lookup gave no answer. None of these resolves a payment: it stays pending and is
/// polled again after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Unknown intent id (or no search hit yet): maybe another account, maybe search lag.
    #[error("not found in Stripe")]
    NotFound,
    /// Stripe's rate limit: the budget is too high for the account; retry later helps.
    #[error("rate limited by Stripe (429)")]
    RateLimited,
    /// Stripe's fault; retry helps.
    #[error("Stripe server error {0}")]
    Server(u16),
    #[error("Stripe request timed out")]
    Timeout,
    /// Network or TLS; retry helps.
    #[error("could not reach Stripe: {0}")]
    Transport(String),
    /// An answer we could not read; retry may help (a proxy page), else Stripe changed shape.
    #[error("unreadable Stripe answer: {0}")]
    Parse(String),
    /// Another 4xx: our request or key is at fault (e.g. 401 bad key); retry will not help
    /// until the configuration is fixed, but the payment is still never resolved on it.
    #[error("Stripe rejected the request ({0}): {1}")]
    Rejected(u16, String),
}

impl LookupError {
    /// The `outcome` label of `paystream_polls_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            LookupError::NotFound => "not_found",
            LookupError::RateLimited => "rate_limited",
            LookupError::Server(_) => "server_error",
            LookupError::Timeout => "timeout",
            LookupError::Transport(_) => "transport_error",
            LookupError::Parse(_) => "parse_error",
            LookupError::Rejected(..) => "rejected",
        }
    }
}

impl From<ClientError> for LookupError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Stripe(err, 404) => {
                let _ = err;
                LookupError::NotFound
            }
            ClientError::Stripe(_, 429) => LookupError::RateLimited,
            ClientError::Stripe(_, s) if s >= 500 => LookupError::Server(s),
            ClientError::Stripe(err, s) => {
                LookupError::Rejected(s, err.message.clone().unwrap_or_default())
            }
            ClientError::Timeout => LookupError::Timeout,
            ClientError::JSONDeserialize(m) => LookupError::Parse(m),
            other => LookupError::Transport(other.to_string()),
        }
    }
}

/// The fields of a PaymentIntent paystream reads.
#[derive(Debug, Clone, Deserialize)]
pub struct IntentView {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub last_payment_error: Option<PaymentError>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PaymentError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub decline_code: Option<String>,
}

#[derive(serde::Serialize)]
struct SearchQuery {
    query: String,
}

#[derive(Debug, Deserialize)]
struct SearchResult {
    data: Vec<IntentView>,
}

/// Maps a PaymentIntent to paystream's answer. Only `succeeded`, `canceled`, and
/// `requires_payment_method` with a `last_payment_error` are final; every other status,
/// including ones Stripe may add later, keeps the payment pending.
pub fn classify(pi: &IntentView) -> Lookup {
    let fin = |status, reason: Option<String>| Lookup::Final {
        status,
        stripe_status: pi.status.clone(),
        reason,
        intent_id: pi.id.clone(),
    };
    match (pi.status.as_str(), &pi.last_payment_error) {
        ("succeeded", _) => fin(FinalStatus::Succeeded, None),
        ("canceled", _) => fin(FinalStatus::Failed, Some("canceled".into())),
        ("requires_payment_method", Some(err)) => {
            let reason = err
                .code
                .clone()
                .or_else(|| err.decline_code.clone())
                .unwrap_or_else(|| "payment_failed".into());
            fin(FinalStatus::Failed, Some(reason))
        }
        (other, _) => Lookup::Pending {
            stripe_status: other.to_string(),
        },
    }
}

/// Several intents carry the same idempotency key: one that succeeded means the money moved;
/// all failed means failed; anything else is doubt, so still pending.
fn classify_many(found: &[IntentView]) -> Option<Lookup> {
    let answers: Vec<Lookup> = found.iter().map(classify).collect();
    if let Some(s) = answers.iter().find(|a| {
        matches!(
            a,
            Lookup::Final {
                status: FinalStatus::Succeeded,
                ..
            }
        )
    }) {
        return Some(s.clone());
    }
    if !answers.is_empty() && answers.iter().all(|a| matches!(a, Lookup::Final { .. })) {
        return answers.into_iter().next();
    }
    answers
        .into_iter()
        .find(|a| matches!(a, Lookup::Pending { .. }))
}

/// One `payment_intent.*` event: its id, when Stripe created it (Unix seconds), its type, and
/// the intent as it was at that moment (a snapshot, not necessarily the intent now).
#[derive(Debug, Clone, Deserialize)]
pub struct IntentEvent {
    pub id: String,
    pub created: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: IntentEventData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IntentEventData {
    pub object: IntentView,
}

/// A page of `GET /v1/events`.
#[derive(Debug, Deserialize)]
pub struct EventPage {
    pub data: Vec<IntentEvent>,
    pub has_more: bool,
}

#[derive(serde::Serialize)]
struct EventQuery<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    created: CreatedSince,
    limit: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    starting_after: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct CreatedSince {
    gte: i64,
}

pub struct StripeApi {
    client: stripe::Client,
    timeout: Duration,
}

impl StripeApi {
    pub fn new(api_base: &str, key: &str, timeout: Duration) -> Result<Self, LookupError> {
        let client = stripe::ClientBuilder::new(key)
            .url(api_base)
            .timeout(timeout)
            .request_strategy(RequestStrategy::Once)
            .build()
            .map_err(LookupError::from)?;
        Ok(StripeApi { client, timeout })
    }

    async fn get(&self, req: RequestBuilder) -> Result<serde_json::Value, LookupError> {
        let v: miniserde::json::Value = req
            .customize()
            .request_strategy(RequestStrategy::Once)
            .timeout(self.timeout)
            .send(&self.client)
            .await?;
        serde_json::from_str(&miniserde::json::to_string(&v))
            .map_err(|e| LookupError::Parse(e.to_string()))
    }

    /// One page of events of `kind` created at or after `since` (Unix seconds), continuing
    /// after `starting_after`. Stripe pages newest first, the emulator oldest first: callers
    /// read every page and do not rely on the order.
    pub async fn list_events(
        &self,
        kind: &str,
        since: i64,
        limit: u32,
        starting_after: Option<&str>,
    ) -> Result<EventPage, LookupError> {
        let query = EventQuery {
            kind,
            created: CreatedSince { gte: since },
            limit,
            starting_after,
        };
        let v = self
            .get(RequestBuilder::new(StripeMethod::Get, "/events").query(&query))
            .await?;
        serde_json::from_value(v).map_err(|e| LookupError::Parse(format!("events page: {e}")))
    }

    /// Looks a payment up: by its intent id when the row has one, else by searching the
    /// idempotency key in the intent's metadata (eventually consistent: a miss is `NotFound`,
    /// retried later, never a failure).
    pub async fn lookup(
        &self,
        intent_id: Option<&str>,
        idempotency_key: &str,
    ) -> Result<Lookup, LookupError> {
        match intent_id {
            Some(id) => {
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(LookupError::NotFound);
                }
                let v = self
                    .get(RequestBuilder::new(
                        StripeMethod::Get,
                        format!("/payment_intents/{id}"),
                    ))
                    .await?;
                let pi: IntentView = serde_json::from_value(v)
                    .map_err(|e| LookupError::Parse(format!("payment_intent: {e}")))?;
                Ok(classify(&pi))
            }
            None => {
                let escaped = idempotency_key.replace('\\', "\\\\").replace('\'', "\\'");
                // A struct, not a slice of pairs: the builder serializes with serde_qs, which
                // turns a slice into `0[0]=query&0[1]=…` (a search Stripe rejects).
                let query = SearchQuery {
                    query: format!("metadata['idempotency_key']:'{escaped}'"),
                };
                let v = self
                    .get(
                        RequestBuilder::new(StripeMethod::Get, "/payment_intents/search")
                            .query(&query),
                    )
                    .await?;
                let res: SearchResult = serde_json::from_value(v)
                    .map_err(|e| LookupError::Parse(format!("search result: {e}")))?;
                // Search matches loosely; keep only exact metadata matches.
                let exact: Vec<IntentView> = res
                    .data
                    .into_iter()
                    .filter(|pi| {
                        pi.metadata
                            .as_ref()
                            .and_then(|m| m.get("idempotency_key"))
                            .and_then(|v| v.as_str())
                            == Some(idempotency_key)
                    })
                    .collect();
                classify_many(&exact).ok_or(LookupError::NotFound)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_a_series_from_the_start() {
        let errors = [
            LookupError::NotFound,
            LookupError::RateLimited,
            LookupError::Server(503),
            LookupError::Timeout,
            LookupError::Transport(String::new()),
            LookupError::Parse(String::new()),
            LookupError::Rejected(401, String::new()),
        ];
        let outcomes = errors.iter().map(|e| e.outcome()).chain([
            FinalStatus::Succeeded.as_str(),
            FinalStatus::Failed.as_str(),
            "still_pending",
        ]);
        for o in outcomes {
            assert!(crate::metrics::POLL_OUTCOMES.contains(&o), "{o}");
        }
    }

    fn pi(status: &str, err: Option<&str>) -> IntentView {
        IntentView {
            id: "pi_1".into(),
            status: status.into(),
            last_payment_error: err.map(|c| PaymentError {
                code: Some(c.into()),
                decline_code: None,
            }),
            metadata: None,
        }
    }

    #[test]
    fn only_final_answers_resolve() {
        assert!(matches!(
            classify(&pi("succeeded", None)),
            Lookup::Final {
                status: FinalStatus::Succeeded,
                ..
            }
        ));
        match classify(&pi("canceled", None)) {
            Lookup::Final {
                status: FinalStatus::Failed,
                reason,
                ..
            } => assert_eq!(reason.as_deref(), Some("canceled")),
            other => panic!("{other:?}"),
        }
        match classify(&pi("requires_payment_method", Some("card_declined"))) {
            Lookup::Final {
                status: FinalStatus::Failed,
                reason,
                ..
            } => assert_eq!(reason.as_deref(), Some("card_declined")),
            other => panic!("{other:?}"),
        }
        for s in [
            "requires_payment_method",
            "requires_action",
            "requires_confirmation",
            "processing",
            "requires_capture",
            "some_future_status",
        ] {
            assert!(
                matches!(classify(&pi(s, None)), Lookup::Pending { .. }),
                "{s}"
            );
        }
    }

    #[test]
    fn several_intents_resolve_only_without_doubt() {
        let ok = pi("succeeded", None);
        let failed = pi("canceled", None);
        let waiting = pi("requires_action", None);
        assert!(matches!(
            classify_many(&[failed.clone(), ok]),
            Some(Lookup::Final {
                status: FinalStatus::Succeeded,
                ..
            })
        ));
        assert!(matches!(
            classify_many(&[failed.clone(), waiting]),
            Some(Lookup::Pending { .. })
        ));
        assert!(matches!(
            classify_many(&[failed.clone(), failed]),
            Some(Lookup::Final {
                status: FinalStatus::Failed,
                ..
            })
        ));
        assert!(classify_many(&[]).is_none());
    }
}
