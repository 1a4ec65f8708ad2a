//! The dev stack (Postgres, the broker, the Stripe emulator), brought up once per test binary
//! by the project's own scripts.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub struct Stack {
    pub brokers: String,
    pub pg_url: String,
    pub stripe: String,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn port(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Brings the dev stack up once per test binary (idempotent scripts).
pub fn stack() -> &'static Stack {
    static S: OnceLock<Stack> = OnceLock::new();
    S.get_or_init(|| {
        let st = Command::new(root().join("scripts/dev-up"))
            .stdout(Stdio::null())
            .status()
            .expect("scripts/dev-up");
        assert!(st.success(), "scripts/dev-up failed");
        Stack {
            brokers: format!("127.0.0.1:{}", port("PAYSTREAM_KAFKA_PORT", 29092)),
            pg_url: format!(
                "host=127.0.0.1 port={} user=postgres dbname=payments",
                port("PAYSTREAM_PG_PORT", 25432)
            ),
            stripe: format!("http://127.0.0.1:{}", port("PAYSTREAM_STRIPE_PORT", 28420)),
        }
    })
}

/// Postgres and the Stripe emulator only (embedded mode needs no broker), once per test binary.
pub fn pg_stripe_stack() -> &'static Stack {
    static S: OnceLock<Stack> = OnceLock::new();
    S.get_or_init(|| {
        for s in ["pg-up", "stripe-up"] {
            let st = Command::new(root().join("scripts").join(s))
                .stdout(Stdio::null())
                .status()
                .expect(s);
            assert!(st.success(), "scripts/{s} failed");
        }
        Stack {
            brokers: String::new(),
            pg_url: format!(
                "host=127.0.0.1 port={} user=postgres dbname=payments",
                port("PAYSTREAM_PG_PORT", 25432)
            ),
            stripe: format!("http://127.0.0.1:{}", port("PAYSTREAM_STRIPE_PORT", 28420)),
        }
    })
}

pub fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{}", n % 1_000_000_000_000)
}

/// Runs one of the project's scripts (e.g. `kafka-down`), failing the test if it fails.
pub fn script(name: &str) {
    let st = Command::new(root().join("scripts").join(name))
        .status()
        .unwrap();
    assert!(st.success(), "scripts/{name}");
}
