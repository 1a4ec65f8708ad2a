//! # paystream
//!
//! Watches pending payments: reads the Debezium change stream of a `payments` table, keeps every
//! pending payment in a checkpointed local state store, polls Stripe once per interval per
//! payment, and emits a `payment-status-update` event when Stripe gives a final answer. The
//! updater writes that status back to the Postgres master, forward only.
//!
//! ## The data flow, one module per part
//!
//! ```text
//! Kafka CDC topic ─▶ source ─▶ decode ─▶ state (sled) ◀─▶ poll ─▶ Stripe
//!                       │                   ▲                │
//!                       └─ DLQ ◀─ sink ◀────┼────────────────┘ (final answers)
//!                                           │
//!                        checkpoint: state + offsets in one atomic batch, then flush,
//!                        then commit offsets to the group
//!
//! status topic ─▶ updater ─▶ Postgres master (UPDATE … WHERE status = 'pending')
//! ```
//!
//! - [`source`]: the Kafka consumer, the per-message pipeline, rebalances and checkpoints. Its
//!   module doc explains why the offset order is safe.
//! - [`decode`]: Debezium message values → normalized change events, exactly (no floats).
//! - [`state`]: the sled store: pending payments, the due-time index, the source offsets.
//! - [`poll`]: the scheduler, the global Stripe rate budget, lookups through async-stripe.
//! - [`sink`]: status events and dead letters, through one idempotent producer.
//! - [`kafka`]: what the Kafka clients share: settings, the start-up probe, the broker watch.
//! - [`updater`]: the forward-only write-back.
//! - [`admin`] and [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`config`]: every flag, its environment variable and config-file key.
//! - [`clock`]: time that tests can pause.
//! - [`run`]: the daemon's wiring and shutdown.
//! - [`replay`]: the same source path fed from files (state rebuilds, benchmarks), and the
//!   generator of realistic event files.
//!
//! Errors are typed at each boundary and say who is at fault and whether retrying helps;
//! `anyhow` appears only in the binary.

pub mod admin;
pub mod clock;
pub mod config;
pub mod decode;
pub mod kafka;
pub mod metrics;
pub mod poll;
pub mod replay;
pub mod run;
pub mod sink;
pub mod source;
pub mod state;
pub mod updater;
