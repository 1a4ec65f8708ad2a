//! The one path every change takes, whichever source read it: decode → state, or → the dead
//! letters; and the checkpoint that makes it durable.
//!
//! A [`crate::source::Source`] owns how messages arrive and what happens to its positions once
//! they are durable (commit offsets, acknowledge an LSN, nothing for a file). Everything between
//! a message's bytes and its durable effect is here, shared, so the Kafka topic, Postgres
//! replication and replayed files cannot drift apart:
//! 1. [`Pipeline::handle`] decodes a message value; a change enters the state overlay together
//!    with the position it leaves behind ([`crate::state::Store::apply_event`]), so state and
//!    position can only become durable together.
//! 2. An undecodable message goes to the dead letters first ([`Pipeline::dead_letter`], retried
//!    until stored); only then does its position move past it. Shutdown while it cannot be
//!    stored leaves the position where it was: the message is read again at the next start.
//! 3. [`Pipeline::checkpoint`] writes the overlay and its positions in one atomic batch (through
//!    the scale-out changelog when there is one) and publishes the checkpoint's time, duration
//!    and positions; the source hands them on only after that returns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::change::{ChangeEvent, Col, Op};
use crate::clock::{Backoff, Clock};
use crate::decode::Decoder;
use crate::metrics::events::{
    emit, Backpressured, CdcEventApplied, DeadLetterRetry, DeadLettered, PaymentRef, Undecodable,
};
use crate::metrics::METRICS;
use crate::sink::{DeadLetter, DeadLetterError, DeadLetters};
use crate::state::{Applied, ChangeLog, Checkpoint, Position, StateError, Store};

/// How many payments may have changes in memory, not yet checkpointed, before a source stops
/// reading until a checkpoint took them ([`Pipeline::room`]). It bounds the memory a reader
/// faster than the disk can fill (each change an entry in the overlay and a record in the
/// next checkpoint's journal, a few hundred bytes each), and so how long one checkpoint takes.
/// Far above what arrives between two checkpoints at the platform's rates: only a backlog (a
/// replay, a snapshot topic read from the start, a catch-up after downtime) meets it.
pub const MAX_UNWRITTEN: usize = 20_000;

/// What readiness needs of every source's checkpoints (each source adds its own facts through
/// [`crate::source::Source::ready`]).
#[derive(Default)]
pub struct Health {
    pub last_checkpoint_ms: AtomicU64,
    /// The state store passed its recovery check (run beside the start).
    pub checked: AtomicBool,
}

/// The processing of one source's messages.
pub struct Pipeline {
    pub state: Arc<Store>,
    pub dead_letters: DeadLetters,
    pub decoder: Decoder,
    pub pending_status: String,
    /// When a new payment's first poll falls due.
    pub poll_interval: Duration,
    pub clock: Clock,
    pub health: Arc<Health>,
}

/// What one message did: its effect on state, or that it went to the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Applied(Applied),
    DeadLettered,
    /// Shutdown came while the message waited (for room in memory, or for its dead letter to
    /// be stored): the position did not move.
    Interrupted,
}

impl Pipeline {
    /// Applies one message read at `offset` of `at` (a Kafka partition, a file; the position
    /// stored is the next offset). Every source of message values comes through here.
    pub async fn handle(
        &self,
        at: &Position,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Handled, StateError> {
        let next = offset + 1;
        if !self.room(shutdown).await {
            return Ok(Handled::Interrupted);
        }
        match self.decoder.for_state(payload).await {
            Ok(ev) => {
                // Only a tombstone needs the key: every other event carries the payment id.
                let key_id = match (&ev.payment, key) {
                    (None, Some(k)) => self.decoder.key(k).await.ok(),
                    _ => None,
                };
                let applied = self
                    .apply(&ev, key_id.as_deref(), (at, next), offset)
                    .await?;
                Ok(Handled::Applied(applied))
            }
            Err(err) => {
                let name = at.name();
                let dl = DeadLetter {
                    key,
                    payload,
                    reason: err.kind.as_str(),
                    detail: &err.detail,
                    topic: &name,
                    partition: at.partition(),
                    offset,
                };
                if !self.dead_letter(&dl, shutdown).await {
                    return Ok(Handled::Interrupted);
                }
                self.state.advance(at, next);
                Ok(Handled::DeadLettered)
            }
        }
    }

    /// Waits while [`MAX_UNWRITTEN`] payments have changes not yet checkpointed (the checkpoint
    /// loop is already woken by them): backpressure onto the source, which then reads no
    /// further. False if shutdown came first.
    pub async fn room(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let unwritten = self.state.unwritten();
        if unwritten < MAX_UNWRITTEN {
            return true;
        }
        let started = tokio::time::Instant::now();
        tokio::select! {
            _ = self.state.room(MAX_UNWRITTEN) => {}
            _ = shutdown.changed() => return false,
        }
        emit(Backpressured {
            unwritten,
            waited: started.elapsed(),
        });
        true
    }

    /// Applies one decoded change event to state with the position it leaves behind
    /// (`(at, next)`: what a restart resumes from), counts and logs it. `offset` is where the
    /// event itself was read (for the log). Every source comes through here.
    pub async fn apply(
        &self,
        ev: &ChangeEvent,
        key_id: Option<&str>,
        position: (&Position, i64),
        offset: i64,
    ) -> Result<Applied, StateError> {
        let (now, interval) = (self.clock.now_ms(), self.poll_interval.as_millis() as u64);
        let applied = if ev.op == Op::Truncate {
            // A truncate visits every entry (a prefix scan of the tree): off the runtime, as
            // every scan is (see `state`, "Blocking"). Rare, so the copies cost nothing.
            let (ev, key) = (ev.clone(), key_id.map(str::to_string));
            let (at, next, pending) = (position.0.clone(), position.1, self.pending_status.clone());
            crate::state::blocking(&self.state, move |s| {
                s.apply_event(&ev, key.as_deref(), (&at, next), now, interval, &pending)
            })
            .await?
        } else {
            self.state
                .apply_event(ev, key_id, position, now, interval, &self.pending_status)?
        };
        let p = ev.payment.as_ref();
        let id = p.map(|p| p.id.as_str()).or(key_id).unwrap_or("");
        // The key and intent as far as this event carries them (a tombstone or a TOASTed
        // column does not).
        let idempotency_key = p.and_then(|p| match &p.idempotency_key {
            Col::Set(k) => Some(k.as_str()),
            Col::Unknown => None,
        });
        let intent_id = p.and_then(|p| match &p.stripe_payment_intent_id {
            Col::Set(i) => i.as_deref(),
            Col::Unknown => None,
        });
        emit(CdcEventApplied {
            op: ev.op.as_str(),
            outcome: applied.as_str(),
            payment: PaymentRef {
                id,
                idempotency_key,
                intent_id,
            },
            partition: position.0.partition(),
            offset,
        });
        Ok(applied)
    }

    /// Stores an undecodable message as a dead letter, retrying (the broker or the disk is at
    /// fault) until it is stored, then counts and logs it. Returns false if shutdown came
    /// first: the caller must then not move its position past the message.
    pub async fn dead_letter(
        &self,
        dl: &DeadLetter<'_>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let message = Undecodable {
            topic: dl.topic,
            partition: dl.partition,
            offset: dl.offset,
            reason: dl.reason,
            error: dl.detail,
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.dead_letters.send(dl).await {
                Ok(()) => break,
                Err(e) => {
                    emit(DeadLetterRetry {
                        message,
                        to_kafka: matches!(e, DeadLetterError::Kafka(_)),
                        error: &e,
                    });
                    if !backoff.wait(shutdown).await {
                        return false;
                    }
                }
            }
        }
        emit(DeadLettered(message));
        true
    }

    /// One checkpoint of state and its positions (through `log`, scale-out's changelog, when
    /// there is one), on a blocking thread since it writes and syncs the disk; then its time,
    /// duration and positions are published. The caller hands the positions on (commit,
    /// acknowledge) only after this returns: they are durable from here.
    pub async fn checkpoint(
        &self,
        log: Option<Arc<dyn ChangeLog + Send + Sync>>,
    ) -> Result<Checkpoint, StateError> {
        let started = tokio::time::Instant::now();
        let cp = crate::state::blocking(&self.state, move |s| {
            s.checkpoint_logged(log.as_deref().map(|l| l as &dyn ChangeLog), |_| {})
        })
        .await?;
        METRICS
            .checkpoint_seconds
            .observe(started.elapsed().as_secs_f64());
        let now = self.clock.now_ms();
        self.health.last_checkpoint_ms.store(now, Ordering::Relaxed);
        METRICS.last_checkpoint_timestamp.set(now as f64 / 1000.0);
        // The offset gauges show the source's positions, not the events feed's cursor.
        for (at, o) in cp.positions.iter().filter(|(at, _)| at.is_source()) {
            METRICS
                .stored_offset
                .with_label_values(&[&at.partition().to_string()])
                .set(*o);
        }
        Ok(cp)
    }
}
