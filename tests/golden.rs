//! Golden tests of the decoder over every file in ../shared/debezium (real Debezium shapes).
//!
//! Each file is one message value (pretty-printed documentation examples included); the
//! decoded event, or the error, is compared with `tests/golden/<dir>/<file>.out`. Files whose
//! name says `key` are message keys and go through `decode_key`. `PAYSTREAM_BLESS=1` rewrites the
//! expected outputs; review the diff before committing. Semantic checks below pin the values
//! that matter (amounts, ops, ids) independently of the golden files.

use std::path::{Path, PathBuf};

use paystream::change::{Col, Op};
use paystream::decode::{decode_key, decode_value, DecodeOptions};

fn shared() -> PathBuf {
    std::env::var_os("PAYSTREAM_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
        .join("debezium")
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(shared().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn render(name: &str, bytes: &[u8]) -> String {
    let o = DecodeOptions::default();
    let v = if name.contains("-key-") {
        match decode_key(bytes, &o) {
            Ok(id) => serde_json::json!({ "key": id }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        }
    } else {
        match decode_value(Some(bytes), &o) {
            Ok(ev) => serde_json::to_value(&ev).unwrap(),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        }
    };
    serde_json::to_string_pretty(&v).unwrap() + "\n"
}

#[test]
fn every_shared_file_matches_its_golden_output() {
    let bless = std::env::var_os("PAYSTREAM_BLESS").is_some();
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for dir in ["payments", "doc"] {
        let mut files: Vec<_> = std::fs::read_dir(shared().join(dir))
            .expect("shared/debezium present")
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for path in files {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".properties") {
                continue; // connector configuration, not a message
            }
            let got = render(&name, &std::fs::read(&path).unwrap());
            let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden")
                .join(dir)
                .join(format!("{name}.out"));
            if bless {
                std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
                std::fs::write(&golden, &got).unwrap();
            } else {
                let want = std::fs::read_to_string(&golden)
                    .unwrap_or_else(|_| format!("<missing {}>", golden.display()));
                if want != got {
                    mismatches.push(format!("{dir}/{name}:\n--- want\n{want}--- got\n{got}"));
                }
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 50,
        "only {checked} files found under {}",
        shared().display()
    );
    assert!(
        mismatches.is_empty(),
        "{} golden mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

fn decode(rel: &str) -> paystream::change::ChangeEvent {
    decode_value(Some(&read(rel)), &DecodeOptions::default())
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn decimal_modes_all_give_the_exact_amount() {
    for mode in ["precise", "string", "double"] {
        let ev = decode(&format!("payments/pg-decimal-{mode}-schema-payments.json"));
        assert_eq!(
            ev.payment.unwrap().amount,
            Col::Set("1234567.89".into()),
            "{mode}"
        );
    }
    let ev = decode("payments/pg-create-noschema-payments.json");
    let p = ev.payment.unwrap();
    assert_eq!(p.amount, Col::Set("49.99".into()));
    assert_eq!(p.status, Col::Set("pending".into()));
    assert_eq!(p.stripe_payment_intent_id, Col::Set(None));
    assert_eq!(ev.source.tx_id, Some(771));
}

#[test]
fn ops_and_special_records() {
    let cases = [
        ("payments/pg-create-schema-payments.json", Op::Create),
        ("payments/pg-update-full-schema-payments.json", Op::Update),
        (
            "payments/pg-delete-default-noschema-payments.json",
            Op::Delete,
        ),
        (
            "payments/pg-read-snapshot-first-noschema-payments.json",
            Op::Read,
        ),
        (
            "payments/pg-read-snapshot-true-schema-payments.json",
            Op::Read,
        ),
        ("payments/pg-truncate-schema-payments.json", Op::Truncate),
        ("payments/pg-message-noschema-payments.json", Op::Message),
        ("payments/pg-heartbeat-value-schema.json", Op::Heartbeat),
        (
            "payments/pg-transaction-begin-noschema-payments.json",
            Op::Transaction,
        ),
        (
            "payments/pg-transaction-end-noschema-payments.json",
            Op::Transaction,
        ),
        (
            "payments/pg-unwrap-create-rewrite-schema-payments.json",
            Op::Create,
        ),
        (
            "payments/pg-unwrap-delete-rewrite-noschema-payments.json",
            Op::Delete,
        ),
        (
            "payments/pg-unwrap-update-rewrite-noschema-payments.json",
            Op::Update,
        ),
    ];
    for (rel, op) in cases {
        assert_eq!(decode(rel).op, op, "{rel}");
    }
    // Deletes carry only the key as real data.
    let p = decode("payments/pg-delete-default-schema-payments.json")
        .payment
        .unwrap();
    assert_eq!(p.id, "3f9c1d6e-8a41-4c7b-9f3e-2b5d7a1c0e94");
    assert!(p.idempotency_key == Col::Unknown && p.amount == Col::Unknown);
    // The transaction id is the part before ':'.
    assert_eq!(
        decode("payments/pg-transaction-begin-noschema-payments.json")
            .source
            .tx_id,
        Some(771)
    );
    // A Kafka null is a tombstone.
    assert_eq!(
        decode_value(None, &DecodeOptions::default()).unwrap().op,
        Op::Tombstone
    );
    assert_eq!(
        decode_key(
            &read("payments/pg-tombstone-key-schema-payments.json"),
            &DecodeOptions::default()
        )
        .unwrap(),
        "3f9c1d6e-8a41-4c7b-9f3e-2b5d7a1c0e94"
    );
}

#[test]
fn decode_cli_reads_lines_and_reports_failures() {
    let mut input = String::new();
    let mut files: Vec<_> = std::fs::read_dir(shared().join("payments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let values: Vec<_> = files
        .iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json") && !p.to_string_lossy().contains("-key-")
        })
        .collect();
    for p in &values {
        input.push_str(std::fs::read_to_string(p).unwrap().trim());
        input.push('\n');
    }
    input.push_str("null\n\n");
    let run = |stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_paystream"))
            .arg("decode")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(&input);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), values.len() + 2);
    assert!(
        lines.iter().all(|l| l.get("op").is_some()),
        "every line decodes"
    );
    assert_eq!(lines[lines.len() - 1]["op"], "tombstone");
    let bad = run("{\"op\":\"c\",\"after\":{\"id\":1}}\n");
    assert!(!bad.status.success());
    let line: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(line["line"], 1);
    assert!(
        line["error"].as_str().unwrap().contains("missing_column"),
        "{line}"
    );
}

/// Three-decimal amounts (Stripe's BHD, JOD, KWD, OMR, TND), as Debezium writes them for a
/// `NUMERIC(p,3)` column (Connect Decimal of scale 3) and for the unconstrained `NUMERIC` of
/// schemas/payments.sql (VariableScaleDecimal: the scale travels with each value), with
/// schemas on and off. Built from the shared precise-mode capture by changing only the amount.
#[test]
fn three_decimal_amounts_decode_exactly() {
    let base: serde_json::Value =
        serde_json::from_slice(&read("payments/pg-decimal-precise-schema-payments.json")).unwrap();
    let amount_schema = |v: &mut serde_json::Value, schema: serde_json::Value| {
        for part in v["schema"]["fields"].as_array_mut().unwrap() {
            if let Some(fields) = part["fields"].as_array_mut() {
                for f in fields.iter_mut().filter(|f| f["field"] == "amount") {
                    *f = schema.clone();
                }
            }
        }
    };
    let amount = |v: &serde_json::Value| {
        decode_value(
            Some(&serde_json::to_vec(v).unwrap()),
            &DecodeOptions::default(),
        )
        .unwrap()
        .payment
        .unwrap()
        .amount
    };
    // (unscaled as Debezium's base64 two's complement, the exact text)
    for (b64, text) in [("FAU=", "5.125"), ("6oQ=", "-5.500"), ("AQ==", "0.001")] {
        let mut fixed = base.clone();
        amount_schema(
            &mut fixed,
            serde_json::json!({"type": "bytes", "optional": false, "name": "org.apache.kafka.connect.data.Decimal",
                "version": 1, "parameters": {"scale": "3", "connect.decimal.precision": "15"}, "field": "amount"}),
        );
        fixed["payload"]["after"]["amount"] = b64.into();
        assert_eq!(amount(&fixed), Col::Set(text.into()), "Decimal {b64}");

        let mut variable = base.clone();
        amount_schema(
            &mut variable,
            serde_json::json!({"type": "struct", "optional": false, "name": "io.debezium.data.VariableScaleDecimal",
                "version": 1, "doc": "Variable scaled decimal", "field": "amount", "fields": [
                    {"type": "int32", "optional": false, "field": "scale"},
                    {"type": "bytes", "optional": false, "field": "value"}]}),
        );
        variable["payload"]["after"]["amount"] = serde_json::json!({"scale": 3, "value": b64});
        assert_eq!(
            amount(&variable),
            Col::Set(text.into()),
            "VariableScaleDecimal {b64}"
        );
        // Schemas off: the payload alone.
        assert_eq!(
            amount(&variable["payload"]),
            Col::Set(text.into()),
            "VariableScaleDecimal without schema {b64}"
        );
    }
}

/// `12.340` and `12.34` are one amount: Debezium's streamed VariableScaleDecimal drops trailing
/// zeros (100.00 arrives as scale 0), `decimal.handling.mode=double` drops the scale too, and
/// paystream compares money by value in the currency's minor unit (`poll/money.rs`).
fn same_amount(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s
        };
        s.to_string()
    };
    norm(a) == norm(b)
}

/// What the real connector writes (Debezium 3.6.3's embedded engine over scripted SQL, once per
/// converter setting: `scripts/capture-golden`, which is also how they are regenerated after a
/// Debezium upgrade). Every record decodes; its rendering matches `<setting>.out`
/// (`PAYSTREAM_BLESS=1` rewrites); each record on the table's topic decodes to what the SQL that
/// made it says (`expected.json`, written by the capture script from its SQL, not from the
/// captures); the state path's fast decoder agrees with the general one on every record.
#[test]
fn real_debezium_captures_decode_to_what_the_sql_wrote() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/real");
    let bless = std::env::var_os("PAYSTREAM_BLESS").is_some();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let data_topic = expected["data_topic"].as_str().unwrap();
    let o = DecodeOptions::default();
    let mut failures = Vec::new();
    let settings = expected["settings"].as_object().unwrap();
    assert!(settings.len() >= 8, "{} settings", settings.len());
    for (name, spec) in settings {
        let text = std::fs::read_to_string(dir.join(format!("{name}.jsonl")))
            .unwrap_or_else(|e| panic!("{name}.jsonl: {e} (scripts/capture-golden writes it)"));
        let mut rendered = String::new();
        let mut data = Vec::new();
        let mut others = std::collections::BTreeMap::<&str, usize>::new();
        for (n, line) in text.lines().enumerate() {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let topic = r["topic"].as_str().unwrap().to_string();
            let value = r["value"].as_str().map(str::as_bytes);
            let ev = decode_value(value, &o);
            let key = (topic == data_topic)
                .then(|| r["key"].as_str().map(|k| decode_key(k.as_bytes(), &o)))
                .flatten();
            let show = |x: Result<serde_json::Value, String>| match x {
                Ok(v) => v,
                Err(e) => serde_json::json!({ "error": e }),
            };
            rendered += &serde_json::to_string(&serde_json::json!({
                "topic": topic,
                "key": key.clone().map(|k| show(k.map(Into::into).map_err(|e| e.to_string()))),
                "event": show(ev.as_ref().map(|e| serde_json::to_value(e).unwrap()).map_err(|e| e.to_string())),
            }))
            .unwrap();
            rendered.push('\n');
            let Ok(ev) = ev else {
                failures.push(format!("{name}:{}: {topic}: {}", n + 1, ev.unwrap_err()));
                continue;
            };
            // The state path's decoder reads the same record the same way.
            let fast = paystream::decode::decode_for_state(value, &o).unwrap();
            if (fast.op, &fast.payment, &fast.source) != (ev.op, &ev.payment, &ev.source) {
                failures.push(format!(
                    "{name}:{}: decode_for_state differs: {fast:?}",
                    n + 1
                ));
            }
            let want_op = if topic == data_topic {
                None
            } else if topic.ends_with(".transaction") {
                Some(Op::Transaction)
            } else if topic.ends_with(".message") {
                Some(Op::Message)
            } else if topic.starts_with("__debezium-heartbeat") {
                Some(Op::Heartbeat)
            } else {
                failures.push(format!("{name}:{}: unexpected topic {topic}", n + 1));
                continue;
            };
            match want_op {
                Some(op) => {
                    *others.entry(op.as_str()).or_default() += 1;
                    if ev.op != op {
                        failures.push(format!("{name}:{}: {topic} decoded as {:?}", n + 1, ev.op));
                    }
                }
                None => data.push((n + 1, key.map(Result::unwrap), ev)),
            }
        }
        let golden = dir.join(format!("{name}.out"));
        if bless {
            std::fs::write(&golden, &rendered).unwrap();
        } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(rendered.as_str()) {
            failures.push(format!(
                "{name}: rendering differs from {}",
                golden.display()
            ));
        }
        // Transaction metadata and messages arrived where they were asked for.
        let txmeta = name.contains("txmeta");
        if txmeta != (others.get("transaction").copied().unwrap_or(0) > 0)
            || others.get("m").copied().unwrap_or(0) < 3
        {
            failures.push(format!("{name}: other topics {others:?}"));
        }
        let rows = spec["rows"].as_array().unwrap();
        if rows.len() != data.len() {
            failures.push(format!(
                "{name}: {} records on {data_topic}, the SQL made {}",
                data.len(),
                rows.len()
            ));
            continue;
        }
        for (want, (line, key, ev)) in rows.iter().zip(&data) {
            let mut bad = Vec::new();
            let s = |k: &str| want[k].as_str();
            if ev.op.as_str() != s("op").unwrap() {
                bad.push(format!("op {:?}", ev.op));
            }
            if key.as_deref() != s("id") {
                bad.push(format!("key {key:?}"));
            }
            match (&ev.payment, s("id")) {
                (Some(p), Some(id)) if p.id == id => {}
                (None, _) if matches!(ev.op, Op::Tombstone | Op::Truncate) => {}
                (p, _) => bad.push(format!("payment {p:?}")),
            }
            if let Some(p) = ev.payment.as_ref().filter(|_| ev.op != Op::Delete) {
                let set = |c: &Col<String>| match c {
                    Col::Set(v) => Some(v.clone()),
                    Col::Unknown => None,
                };
                match (set(&p.amount), s("amount")) {
                    (Some(got), Some(w)) if same_amount(&got, w) => {}
                    (got, w) => bad.push(format!("amount {got:?}, the SQL wrote {w:?}")),
                }
                if set(&p.currency).as_deref() != s("currency") {
                    bad.push(format!("currency {:?}", p.currency));
                }
                if set(&p.status).as_deref() != s("status") {
                    bad.push(format!("status {:?}", p.status));
                }
            }
            // The old row: none (DEFAULT identity update), only the key (DEFAULT delete: what
            // Debezium fills in is not the row), or the whole old row (FULL).
            let before = ev.before.as_ref();
            let ok = match s("before") {
                None => before.is_none() || ev.op == Op::Delete,
                Some("key") => before.is_some_and(|b| b.keys().eq(["id"])),
                Some(status) => before.is_some_and(|b| {
                    b.get("status").and_then(|v| v.as_str()) == Some(status)
                        && b.get("idempotency_key").and_then(|v| v.as_str())
                            == Some(&format!("golden-{}", s("id").unwrap()))
                }),
            };
            if !ok {
                bad.push(format!("before {before:?}, want {:?}", s("before")));
            }
            if !bad.is_empty() {
                failures.push(format!("{name}:{line}: {}", bad.join("; ")));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
