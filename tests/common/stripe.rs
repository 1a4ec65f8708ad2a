//! The Stripe emulator (localstripe behind `scripts/stripe_emulator.py`): Stripe's API as tests
//! use it, and the emulator's own endpoints (faults, bulk set-up, the request log).

use std::process::Command;

pub fn stripe_post(base: &str, path: &str, form: &[(&str, &str)]) -> serde_json::Value {
    stripe_post_in(base, path, form, None)
}

/// [`stripe_post`] in a Stripe Connect account (`Stripe-Account`), when given.
pub fn stripe_post_in(
    base: &str,
    path: &str,
    form: &[(&str, &str)],
    account: Option<&str>,
) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-X",
        "POST",
        "-H",
        "Authorization: Bearer sk_test_paystream",
    ])
    .arg(format!("{base}{path}"));
    if let Some(a) = account {
        cmd.arg("-H").arg(format!("Stripe-Account: {a}"));
    }
    for (k, v) in form {
        cmd.arg("-d").arg(format!("{k}={v}"));
    }
    let out = cmd.output().expect("curl");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn stripe_get(base: &str, path: &str) -> serde_json::Value {
    stripe_get_in(base, path, None)
}

/// [`stripe_get`] in a Stripe Connect account, when given.
pub fn stripe_get_in(base: &str, path: &str, account: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-H", "Authorization: Bearer sk_test_paystream"]);
    if let Some(a) = account {
        cmd.arg("-H").arg(format!("Stripe-Account: {a}"));
    }
    let out = cmd.arg(format!("{base}{path}")).output().expect("curl");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn card_pm(base: &str, number: &str) -> String {
    let pm = stripe_post(
        base,
        "/v1/payment_methods",
        &[
            ("type", "card"),
            ("card[number]", number),
            ("card[exp_month]", "12"),
            ("card[exp_year]", "2034"),
            ("card[cvc]", "123"),
        ],
    );
    pm["id"].as_str().unwrap().to_string()
}

/// A PaymentIntent confirmed with `card`; returns (id, status).
pub fn intent_with_card(base: &str, amount: &str, number: &str) -> (String, String) {
    intent_with_card_keyed(base, amount, number, None)
}

/// Like [`intent_with_card`], with `metadata[idempotency_key]` set when `key` is given (the
/// payment service's link when a row has no intent id yet: paystream then searches by it).
pub fn intent_with_card_keyed(
    base: &str,
    amount: &str,
    number: &str,
    key: Option<&str>,
) -> (String, String) {
    intent(
        base,
        &Intent {
            amount,
            card: number,
            key,
            ..Intent::default()
        },
    )
}

/// A PaymentIntent to create and confirm in the emulator.
pub struct Intent<'a> {
    /// In the currency's minor unit.
    pub amount: &'a str,
    pub currency: &'a str,
    pub card: &'a str,
    /// `metadata[idempotency_key]`.
    pub key: Option<&'a str>,
    /// `capture_method=manual`: the confirm authorizes, a capture takes the money.
    pub manual_capture: bool,
    /// Stripe Connect: the connected account the intent is made in.
    pub account: Option<&'a str>,
}

impl Default for Intent<'_> {
    fn default() -> Self {
        Intent {
            amount: "1000",
            currency: "usd",
            card: "4242424242424242",
            key: None,
            manual_capture: false,
            account: None,
        }
    }
}

/// Creates and confirms `spec`; returns (id, status).
pub fn intent(base: &str, spec: &Intent<'_>) -> (String, String) {
    let pm = card_pm(base, spec.card);
    let mut form = vec![
        ("amount", spec.amount),
        ("currency", spec.currency),
        ("payment_method", pm.as_str()),
    ];
    if let Some(k) = spec.key {
        form.push(("metadata[idempotency_key]", k));
    }
    if spec.manual_capture {
        form.push(("capture_method", "manual"));
    }
    let pi = stripe_post_in(base, "/v1/payment_intents", &form, spec.account);
    let id = pi["id"].as_str().unwrap().to_string();
    // A decline answers the confirm with a 402 error; the intent itself holds the outcome.
    let pi = stripe_post_in(
        base,
        &format!("/v1/payment_intents/{id}/confirm"),
        &[],
        spec.account,
    );
    let status = match pi["status"].as_str() {
        Some(s) => s.to_string(),
        // The 402 of a decline: the intent as it is now.
        None => stripe_get_in(base, &format!("/v1/payment_intents/{id}"), spec.account)["status"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    };
    (id, status)
}

/// A POST of JSON to one of the emulator's own endpoints (`/_paystream/...`).
pub fn emulator_post(base: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!("{base}{path}"))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn bulk_intents(base: &str, n: usize, card: &str, prefix: &str) -> Vec<String> {
    let v = emulator_post(
        base,
        "/_paystream/bulk_intents",
        &serde_json::json!({"n": n, "card": card, "key_prefix": prefix}),
    );
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect()
}

/// Confirms intents; returns the emulator's time of it (the clock of its request log).
pub fn confirm(base: &str, ids: &[String]) -> f64 {
    emulator_post(
        base,
        "/_paystream/bulk_confirm",
        &serde_json::json!({ "ids": ids }),
    )["at"]
        .as_f64()
        .unwrap()
}

/// Removes every fault set with `/_paystream/faults` (tests that share the emulator run after).
pub fn clear_faults(base: &str) {
    let _ = Command::new("curl")
        .args(["-sS", "-X", "DELETE", &format!("{base}/_paystream/faults")])
        .output();
}

/// What the emulator recorded of the requests made with `key` (`/_paystream/stats`): `log`, a
/// list of `[emulator time, method, path]`, and the counts and rates beside it. The one reader
/// of the emulator's request log.
pub fn stripe_stats(base: &str, key: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sS", &format!("{base}/_paystream/stats?key={key}")])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// This key's requests: (emulator time, method, path), and the most in any one second.
pub fn requests(base: &str, key: &str) -> (Vec<(f64, String, String)>, f64) {
    let v = stripe_stats(base, key);
    let log = v["log"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|r| {
                    (
                        r[0].as_f64().unwrap(),
                        r[1].as_str().unwrap().to_string(),
                        r[2].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (log, v["max_per_second"].as_f64().unwrap_or(0.0))
}

pub fn retrieves_of(log: &[(f64, String, String)], intent: &str, after: f64) -> usize {
    let path = format!("/v1/payment_intents/{intent}");
    log.iter()
        .filter(|(t, m, p)| *t > after && m == "GET" && *p == path)
        .count()
}

/// The customer retries a declined intent with another card: a new attempt on the same intent,
/// as Stripe allows (the emulator's wrapper adds it). Returns the intent's status after it.
pub fn retry_intent(base: &str, id: &str, number: &str) -> String {
    let pm = card_pm(base, number);
    let pi = stripe_post(
        base,
        &format!("/v1/payment_intents/{id}/confirm"),
        &[("payment_method", pm.as_str())],
    );
    pi["status"].as_str().unwrap_or("").to_string()
}

pub fn intent_canceled(base: &str, amount: &str) -> String {
    let pi = stripe_post(
        base,
        "/v1/payment_intents",
        &[("amount", amount), ("currency", "usd")],
    );
    let id = pi["id"].as_str().unwrap().to_string();
    let c = stripe_post(base, &format!("/v1/payment_intents/{id}/cancel"), &[]);
    assert_eq!(c["status"], "canceled");
    id
}
