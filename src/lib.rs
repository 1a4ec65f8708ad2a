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
//!  (or, embedded:       │                   ▲                │
//!   Postgres slot)      └─ DLQ ◀─ sink ◀────┼────────────────┘ (final answers)
//!                                           │
//!                        checkpoint: state + offsets in one atomic batch, then flush,
//!                        then commit offsets to the group (or acknowledge the slot's LSN)
//!
//! status topic ─▶ updater ─▶ Postgres master (UPDATE … WHERE status = 'pending')
//! ```
//!
//! ## Layers: imports only go down
//!
//! Lowest first; a module names only modules of lower layers (`scripts/check-layers` proves it
//! and that the graph has no cycle, and `scripts/test` runs it):
//!
//! 1. Leaves, knowing no other module: [`clock`] (time tests can pause), [`secret`] (values
//!    that never print), [`metrics`] (the registry, and [`metrics::events`]: each thing that
//!    happens as a typed event that logs and counts in one place; label sets and gauges belong
//!    to their owners), [`change`] (the change-event model and its exact [`change::Decimal`]), [`pg`]
//!    (what Postgres connections share: quoting, `application_name`).
//! 2. [`kafka`]: what the Kafka clients share: settings, the start-up probe, the broker watch.
//! 3. [`decode`]: Debezium message values → change events, exactly (no floats): the envelope
//!    and the column values each in a file of their own; [`decode::avro`] and
//!    [`decode::registry`] for Confluent Avro, [`decode::pgoutput`] for embedded mode's
//!    replication messages.
//! 4. [`state`]: the sled store: pending payments, the due-time index, each source's
//!    [`state::Position`], checkpoints; one file per concern (its module doc is the map), with
//!    [`state::changelog`] (the changelog's records) and [`state::inspect`] (what `paystream
//!    state` prints).
//! 5. [`sink`]: status events and dead letters through one idempotent producer, the dead-letter
//!    file, and [`sink::postgres`], the forward-only write-back (`paystream updater`, `run
//!    --sink postgres`).
//! 6. [`scaleout`]: who owns a partition (the group lease) and [`scaleout::changelog`], how its
//!    state moves to the next owner.
//! 7. [`poll`]: the scheduler and lookups through async-stripe, what each answer does (its
//!    `outcome` file); [`poll::ratelimit`] (the Stripe budget, adaptive on 429s), [`poll::feed`]
//!    (the events feed and its cycle), [`poll::money`] (the exact amount check before
//!    `succeeded`).
//! 8. [`pipeline`]: decode → state, or → the dead letters, and the checkpoint: the one path
//!    every source's messages take.
//! 9. [`source`]: the [`source::Source`] trait and its three implementations:
//!    [`source::kafka`] (the consumer group, rebalances, offsets committed after checkpoints;
//!    its module doc explains why that order is safe), [`source::postgres`] (embedded mode's
//!    logical replication straight from a slot) and [`source::file`] (`paystream replay`).
//! 10. [`config`]: every flag, its environment variable and config-file key, and validation,
//!     one file per command plus the shared arguments and the config file; it builds nothing.
//! 11. [`admin`]: `/metrics`, `/healthz`, `/readyz`; [`admin::cli`] the `paystream state`
//!     command.
//! 12. The commands, where the wiring lives: [`run`] (the daemon: one source, one sink, the
//!     poller and the checkpoints, supervised; the one `match` on the kind of source is there),
//!     then [`replay`] (the file source, reusing run's wiring) and [`updater`] (the status topic
//!     → [`sink::postgres`]).
//!
//! Known gap: gauges are set where their value is known, not through [`metrics::events`] (an
//! event is something that happened; a gauge is a value now).
//!
//! Errors are typed at each boundary (`thiserror`); each says who is at fault, and has a
//! `retryable()` that says whether trying again later may help without anyone changing
//! anything. Retry loops that wait out an outage share one [`clock::Backoff`]. `anyhow`
//! appears only in the binary.

pub mod admin;
pub mod change;
pub mod clock;
pub mod config;
pub mod decode;
pub mod kafka;
pub mod metrics;
pub mod pg;
pub mod pipeline;
pub mod poll;
pub mod replay;
pub mod run;
pub mod scaleout;
pub mod secret;
pub mod sink;
pub mod source;
pub mod state;
pub mod updater;
