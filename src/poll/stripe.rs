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

use crate::sink::Seen;

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

/// What Stripe said about an intent, as the status event carries it.
pub fn seen(pi: &IntentView) -> Seen {
    Seen {
        intent_id: pi.id.clone(),
        stripe_status: pi.status.clone(),
        amount_received: pi.amount_received,
        currency: pi.currency.clone(),
    }
}

/// What the row says was charged: the other side of the amount check.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The row's exact decimal, in major units.
    pub amount: &'a str,
    pub currency: &'a str,
}

/// A declined attempt: Stripe returned the intent to `requires_payment_method` with a
/// `last_payment_error`, and the customer may retry on the same intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decline {
    /// Stripe's `decline_code`, else its error `code`, else `payment_failed`.
    pub code: String,
    /// What tells this attempt from an earlier one when the same decline is seen again by the
    /// next poll: the failed charge's id, else the payment method's, else the code.
    pub attempt: String,
}

/// Why Stripe's `succeeded` cannot be written: the flag's kind (also the poll outcome label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchKind {
    /// The amount received or the currency differs from the row (a wrong intent, a tampered
    /// amount, a partial capture), or the answer lacks them.
    Amount,
    /// More than one intent succeeded for the row's idempotency key: the customer may have
    /// been charged twice.
    DoubleCharge,
}

impl MismatchKind {
    pub const ALL: [MismatchKind; 2] = [MismatchKind::Amount, MismatchKind::DoubleCharge];

    pub fn as_str(self) -> &'static str {
        match self {
            MismatchKind::Amount => "amount_mismatch",
            MismatchKind::DoubleCharge => "double_charge",
        }
    }
}

/// The answer of one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Stripe's final answer, checked against the row: write it.
    Final {
        status: FinalStatus,
        reason: Option<String>,
        seen: Seen,
    },
    /// Not final yet (a decline included: the customer may retry on the same intent).
    Pending {
        stripe_status: String,
        decline: Option<Decline>,
    },
    /// Stripe says `succeeded`, but the money does not match the row: never written, flagged
    /// for a person, asked about again at the stale cadence.
    Mismatch {
        kind: MismatchKind,
        /// Both sides, for the log line and `paystream state`.
        detail: String,
        seen: Seen,
    },
}

impl Lookup {
    /// The intent status Stripe reported.
    pub fn stripe_status(&self) -> &str {
        match self {
            Lookup::Final { seen, .. } | Lookup::Mismatch { seen, .. } => &seen.stripe_status,
            Lookup::Pending { stripe_status, .. } => stripe_status,
        }
    }
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
    /// Stripe refused a Search for this account (Search is not available everywhere): the
    /// account's setting, not the key; rows without an intent id cannot be found until the
    /// payment service writes their intent id.
    #[error("Stripe refused the search ({0}): {1}")]
    SearchUnavailable(u16, String),
}

impl LookupError {
    /// Whether asking again later may get an answer: Stripe or the network is at fault (429,
    /// 5xx, timeouts, transport, an unreadable answer, an unknown id that may appear). A
    /// rejected request (auth, a bad parameter) and a refused search need the operator.
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            LookupError::Rejected(..) | LookupError::SearchUnavailable(..)
        )
    }
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
            LookupError::SearchUnavailable(..) => "search_unavailable",
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
    /// What was captured, in the currency's minor unit (0 until the intent succeeds).
    #[serde(default)]
    pub amount_received: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
    /// Why a canceled intent was canceled (`abandoned`, `duplicate`, ...), when given.
    #[serde(default)]
    pub cancellation_reason: Option<String>,
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
    /// The failed charge (card errors).
    #[serde(default)]
    pub charge: Option<String>,
    #[serde(default)]
    pub payment_method: Option<PaymentMethodRef>,
}

/// `last_payment_error.payment_method`: only its id is read.
#[derive(Debug, Clone, Deserialize)]
pub struct PaymentMethodRef {
    pub id: String,
}

#[derive(serde::Serialize)]
struct CancelForm {
    cancellation_reason: &'static str,
}

/// The statuses from which Stripe lets an intent be canceled (its cancel endpoint's reference;
/// `processing` only for some payment methods, so not here).
pub const CANCELABLE: [&str; 4] = [
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "requires_capture",
];

/// A Search that Stripe refuses for the account, not for the key (Search is not available in
/// every region or account: a 400 naming it), is its own outcome: `rejected` means the key is
/// wrong, and would page someone for the wrong thing.
fn search_refusal(e: LookupError) -> LookupError {
    match e {
        LookupError::Rejected(s, m) if s != 401 && s != 403 => LookupError::SearchUnavailable(s, m),
        other => other,
    }
}

/// A connected account id as Stripe writes it.
pub fn is_account_id(id: &str) -> bool {
    id.strip_prefix("acct_")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// An id paystream puts in a URL path: Stripe ids are `[A-Za-z0-9_]`.
fn is_intent_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[derive(serde::Serialize)]
struct SearchQuery {
    query: String,
}

#[derive(Debug, Deserialize)]
struct SearchResult {
    data: Vec<IntentView>,
}

/// Maps a PaymentIntent to paystream's answer, checked against what the row says was charged.
///
/// Only two statuses are final (Stripe's PaymentIntent lifecycle): `succeeded` and `canceled`.
/// A decline is not: Stripe returns the intent to `requires_payment_method` with a
/// `last_payment_error` so that the customer can retry on the same intent, and the retry may
/// succeed. Every other status, including ones Stripe may add later, keeps the payment pending.
///
/// `succeeded` is written only when the currency matches the row (case-insensitive) and
/// `amount_received` equals the row's amount in minor units, exactly; anything else (a wrong
/// intent, a tampered amount, a partial capture, an answer without the amounts) is a
/// [`Lookup::Mismatch`]: money moved, but not the money the row says, so a person must look.
pub fn classify(pi: &IntentView, row: Expected<'_>) -> Lookup {
    match pi.status.as_str() {
        "succeeded" => match check_money(pi, row) {
            Ok(()) => Lookup::Final {
                status: FinalStatus::Succeeded,
                reason: None,
                seen: seen(pi),
            },
            Err(detail) => Lookup::Mismatch {
                kind: MismatchKind::Amount,
                detail,
                seen: seen(pi),
            },
        },
        "canceled" => Lookup::Final {
            status: FinalStatus::Failed,
            reason: Some(
                pi.cancellation_reason
                    .clone()
                    .unwrap_or_else(|| "canceled".into()),
            ),
            seen: seen(pi),
        },
        other => Lookup::Pending {
            stripe_status: other.to_string(),
            decline: match (other, &pi.last_payment_error) {
                ("requires_payment_method", Some(err)) => Some(decline_of(err)),
                _ => None,
            },
        },
    }
}

fn decline_of(err: &PaymentError) -> Decline {
    let code = err
        .decline_code
        .clone()
        .or_else(|| err.code.clone())
        .unwrap_or_else(|| "payment_failed".into());
    let attempt = err
        .charge
        .clone()
        .or_else(|| err.payment_method.as_ref().map(|p| p.id.clone()))
        .unwrap_or_else(|| code.clone());
    Decline { code, attempt }
}

/// The amount check: `Err` says both sides.
fn check_money(pi: &IntentView, row: Expected<'_>) -> Result<(), String> {
    let want = super::money::to_minor_units(row.amount, row.currency);
    let (Some(got), Some(cur)) = (pi.amount_received, pi.currency.as_deref()) else {
        return Err(format!(
            "Stripe's answer lacks amount_received or currency; row {} {}",
            row.amount, row.currency
        ));
    };
    if !cur.eq_ignore_ascii_case(row.currency.trim()) {
        return Err(format!(
            "currency: Stripe {cur}, row {} (amount_received {got}, row amount {})",
            row.currency, row.amount
        ));
    }
    match want {
        Ok(w) if w == got => Ok(()),
        Ok(w) => Err(format!(
            "amount: Stripe received {got} {cur}, row {} {} = {w}",
            row.amount, row.currency
        )),
        Err(e) => Err(format!("Stripe received {got} {cur}; {e}")),
    }
}

/// Several intents carry the row's idempotency key (found by Search). Search is eventually
/// consistent and may miss intents, so it resolves only what it cannot be wrong about: exactly
/// one intent that succeeded (and passes the amount check). Two that succeeded are a double
/// charge, flagged; canceled hits are never taken as the payment's failure (a newer intent may
/// not be indexed yet), so the payment stays pending.
fn classify_many(found: &[IntentView], row: Expected<'_>) -> Option<Lookup> {
    let succeeded: Vec<&IntentView> = found.iter().filter(|pi| pi.status == "succeeded").collect();
    match succeeded.as_slice() {
        [] => found.first().map(|pi| match classify(pi, row) {
            Lookup::Final { seen, .. } => Lookup::Pending {
                stripe_status: seen.stripe_status,
                decline: None,
            },
            other => other,
        }),
        [one] => Some(classify(one, row)),
        [first, ..] => Some(Lookup::Mismatch {
            kind: MismatchKind::DoubleCharge,
            detail: format!(
                "{} intents succeeded for one idempotency key: {}",
                succeeded.len(),
                succeeded
                    .iter()
                    .map(|pi| pi.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            seen: seen(first),
        }),
    }
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
    /// Several types in one listing (serialized `types[0]=…&types[1]=…`, as Stripe reads
    /// arrays).
    types: &'a [&'a str],
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
    /// `account`: Stripe Connect's connected account every request acts on (`Stripe-Account`),
    /// unless a request names its own.
    pub fn new(
        api_base: &str,
        key: &str,
        timeout: Duration,
        account: Option<&str>,
    ) -> Result<Self, LookupError> {
        let mut builder = stripe::ClientBuilder::new(key)
            .url(api_base)
            .timeout(timeout)
            .request_strategy(RequestStrategy::Once);
        if let Some(a) = account {
            builder = builder.account_id(stripe::AccountId::from(a));
        }
        let client = builder.build().map_err(LookupError::from)?;
        Ok(StripeApi { client, timeout })
    }

    async fn get(
        &self,
        req: RequestBuilder,
        account: Option<&str>,
    ) -> Result<serde_json::Value, LookupError> {
        self.send(req, RequestStrategy::Once, account).await
    }

    /// Sends once with `strategy`, in `account` when given (else the client's).
    async fn send(
        &self,
        req: RequestBuilder,
        strategy: RequestStrategy,
        account: Option<&str>,
    ) -> Result<serde_json::Value, LookupError> {
        let mut req = req
            .customize()
            .request_strategy(strategy)
            .timeout(self.timeout);
        if let Some(a) = account {
            req = req.account_id(stripe::AccountId::from(a));
        }
        let v: miniserde::json::Value = req.send(&self.client).await?;
        serde_json::from_str(&miniserde::json::to_string(&v))
            .map_err(|e| LookupError::Parse(e.to_string()))
    }

    /// Cancels an abandoned intent (`cancellation_reason=abandoned`), once, under an
    /// `Idempotency-Key` derived from the intent: a cancel repeated after a crash or a timeout
    /// is the same request to Stripe. Returns the intent as Stripe answered; only a `canceled`
    /// answer may resolve anything.
    pub async fn cancel_abandoned(
        &self,
        intent_id: &str,
        account: Option<&str>,
    ) -> Result<IntentView, LookupError> {
        if !is_intent_id(intent_id) {
            return Err(LookupError::NotFound);
        }
        let key = stripe_client_core::IdempotencyKey::new(format!("paystream-abandon-{intent_id}"))
            .map_err(|e| LookupError::Rejected(0, e.to_string()))?;
        let v = self
            .send(
                RequestBuilder::new(
                    StripeMethod::Post,
                    format!("/payment_intents/{intent_id}/cancel"),
                )
                .form(&CancelForm {
                    cancellation_reason: "abandoned",
                }),
                RequestStrategy::Idempotent(key),
                account,
            )
            .await?;
        serde_json::from_value(v).map_err(|e| LookupError::Parse(format!("payment_intent: {e}")))
    }

    /// One page of events of any of `types` created at or after `since` (Unix seconds),
    /// continuing after `starting_after`. Stripe pages newest first (the feed's cursor relies
    /// on it: see `Poller::reconcile`).
    pub async fn list_events(
        &self,
        types: &[&str],
        since: i64,
        limit: u32,
        starting_after: Option<&str>,
    ) -> Result<EventPage, LookupError> {
        let query = EventQuery {
            types,
            created: CreatedSince { gte: since },
            limit,
            starting_after,
        };
        let v = self
            .get(
                RequestBuilder::new(StripeMethod::Get, "/events").query(&query),
                None,
            )
            .await?;
        serde_json::from_value(v).map_err(|e| LookupError::Parse(format!("events page: {e}")))
    }

    /// Looks a payment up: by its intent id when the row has one, else by searching the
    /// idempotency key in the intent's metadata (eventually consistent: a miss is `NotFound`,
    /// retried later, never a failure; see `classify_many` for what a hit may resolve). The
    /// payment service must set `metadata[idempotency_key]` on every intent it creates, or a row
    /// without an intent id is never found.
    pub async fn lookup(
        &self,
        intent_id: Option<&str>,
        idempotency_key: &str,
        row: Expected<'_>,
        account: Option<&str>,
    ) -> Result<Lookup, LookupError> {
        match intent_id {
            Some(id) => {
                if !is_intent_id(id) {
                    return Err(LookupError::NotFound);
                }
                let v = self
                    .get(
                        RequestBuilder::new(StripeMethod::Get, format!("/payment_intents/{id}")),
                        account,
                    )
                    .await?;
                let pi: IntentView = serde_json::from_value(v)
                    .map_err(|e| LookupError::Parse(format!("payment_intent: {e}")))?;
                Ok(classify(&pi, row))
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
                        account,
                    )
                    .await
                    .map_err(search_refusal)?;
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
                classify_many(&exact, row).ok_or(LookupError::NotFound)
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
            LookupError::SearchUnavailable(400, String::new()),
        ];
        let outcomes = errors
            .iter()
            .map(|e| e.outcome())
            .chain(MismatchKind::ALL.map(MismatchKind::as_str))
            .chain([
                FinalStatus::Succeeded.as_str(),
                FinalStatus::Failed.as_str(),
                "still_pending",
                "declined",
            ]);
        for o in outcomes {
            assert!(crate::metrics::POLL_OUTCOMES.contains(&o), "{o}");
        }
    }

    const ROW: Expected<'static> = Expected {
        amount: "12.50",
        currency: "usd",
    };

    fn pi(status: &str, err: Option<&str>) -> IntentView {
        IntentView {
            id: "pi_1".into(),
            status: status.into(),
            amount_received: Some(if status == "succeeded" { 1250 } else { 0 }),
            currency: Some("usd".into()),
            cancellation_reason: None,
            last_payment_error: err.map(|c| PaymentError {
                code: Some(c.into()),
                decline_code: None,
                charge: Some("ch_1".into()),
                payment_method: None,
            }),
            metadata: None,
        }
    }

    fn status_of(l: &Lookup) -> Option<FinalStatus> {
        match l {
            Lookup::Final { status, .. } => Some(*status),
            _ => None,
        }
    }

    #[test]
    fn only_succeeded_and_canceled_are_final() {
        let ok = classify(&pi("succeeded", None), ROW);
        assert_eq!(status_of(&ok), Some(FinalStatus::Succeeded));
        match ok {
            Lookup::Final { seen, .. } => {
                assert_eq!(seen.amount_received, Some(1250));
                assert_eq!(seen.currency.as_deref(), Some("usd"));
                assert_eq!(seen.intent_id, "pi_1");
            }
            other => panic!("{other:?}"),
        }
        match classify(&pi("canceled", None), ROW) {
            Lookup::Final {
                status: FinalStatus::Failed,
                reason,
                ..
            } => assert_eq!(reason.as_deref(), Some("canceled")),
            other => panic!("{other:?}"),
        }
        let mut abandoned = pi("canceled", None);
        abandoned.cancellation_reason = Some("abandoned".into());
        match classify(&abandoned, ROW) {
            Lookup::Final { reason, .. } => assert_eq!(reason.as_deref(), Some("abandoned")),
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
                matches!(
                    classify(&pi(s, None), ROW),
                    Lookup::Pending { decline: None, .. }
                ),
                "{s}"
            );
        }
    }

    #[test]
    fn a_decline_is_an_attempt_not_the_end() {
        match classify(&pi("requires_payment_method", Some("card_declined")), ROW) {
            Lookup::Pending {
                stripe_status,
                decline: Some(d),
            } => {
                assert_eq!(stripe_status, "requires_payment_method");
                assert_eq!(d.code, "card_declined");
                assert_eq!(d.attempt, "ch_1");
            }
            other => panic!("{other:?}"),
        }
        // The decline code is the more precise one when Stripe gives both.
        let mut p = pi("requires_payment_method", Some("card_declined"));
        p.last_payment_error.as_mut().unwrap().decline_code = Some("insufficient_funds".into());
        p.last_payment_error.as_mut().unwrap().charge = None;
        match classify(&p, ROW) {
            Lookup::Pending {
                decline: Some(d), ..
            } => {
                assert_eq!(d.code, "insufficient_funds");
                assert_eq!(d.attempt, "insufficient_funds");
            }
            other => panic!("{other:?}"),
        }
        // A stale error on an intent the customer is retrying is no decline of this attempt.
        assert!(matches!(
            classify(&pi("processing", Some("card_declined")), ROW),
            Lookup::Pending { decline: None, .. }
        ));
    }

    fn succeeded(received: Option<i64>, currency: Option<&str>) -> IntentView {
        let mut p = pi("succeeded", None);
        p.amount_received = received;
        p.currency = currency.map(str::to_string);
        p
    }

    #[test]
    fn succeeded_is_written_only_when_the_money_matches() {
        let mismatch = |p: &IntentView, row| match classify(p, row) {
            Lookup::Mismatch { kind, detail, .. } => {
                assert_eq!(kind, MismatchKind::Amount);
                detail
            }
            other => panic!("{other:?}"),
        };
        // Currency compared case-insensitively.
        assert!(status_of(&classify(&succeeded(Some(1250), Some("USD")), ROW)).is_some());
        // A partial capture, a tampered amount, another currency, a missing amount.
        let d = mismatch(&succeeded(Some(1000), Some("usd")), ROW);
        assert!(
            d.contains("1000") && d.contains("12.50") && d.contains("1250"),
            "{d}"
        );
        mismatch(&succeeded(Some(125), Some("usd")), ROW);
        let d = mismatch(&succeeded(Some(1250), Some("eur")), ROW);
        assert!(d.contains("eur") && d.contains("usd"), "{d}");
        mismatch(&succeeded(None, Some("usd")), ROW);
        mismatch(&succeeded(Some(1250), None), ROW);
        // A row amount no Stripe amount equals.
        mismatch(
            &succeeded(Some(1234), Some("usd")),
            Expected {
                amount: "12.345",
                currency: "usd",
            },
        );
        // Zero- and three-decimal currencies.
        let jpy = Expected {
            amount: "500",
            currency: "jpy",
        };
        assert!(status_of(&classify(&succeeded(Some(500), Some("jpy")), jpy)).is_some());
        mismatch(&succeeded(Some(50000), Some("jpy")), jpy);
        let kwd = Expected {
            amount: "5.120",
            currency: "KWD",
        };
        assert!(status_of(&classify(&succeeded(Some(5120), Some("kwd")), kwd)).is_some());
        mismatch(&succeeded(Some(512), Some("kwd")), kwd);
        // A canceled intent fails whatever its amounts.
        assert_eq!(
            status_of(&classify(&pi("canceled", None), jpy)),
            Some(FinalStatus::Failed)
        );
    }

    #[test]
    fn search_hits_resolve_only_without_doubt() {
        let ok = pi("succeeded", None);
        let canceled = pi("canceled", None);
        let waiting = pi("requires_action", None);
        assert_eq!(
            status_of(&classify_many(&[canceled.clone(), ok.clone()], ROW).unwrap()),
            Some(FinalStatus::Succeeded)
        );
        assert!(matches!(
            classify_many(&[canceled.clone(), waiting], ROW),
            Some(Lookup::Pending { .. })
        ));
        // Search may not have indexed a newer intent yet: canceled hits never fail a payment.
        assert!(matches!(
            classify_many(&[canceled.clone(), canceled], ROW),
            Some(Lookup::Pending { .. })
        ));
        // Two intents that succeeded for one key: a double charge, flagged.
        let mut other = ok.clone();
        other.id = "pi_2".into();
        match classify_many(&[ok, other], ROW) {
            Some(Lookup::Mismatch { kind, detail, .. }) => {
                assert_eq!(kind, MismatchKind::DoubleCharge);
                assert!(
                    detail.contains("pi_1") && detail.contains("pi_2"),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(classify_many(&[], ROW).is_none());
    }
}
