//! Scale-out on Kafka's consumer group: which CDC partitions this instance owns, the group
//! lease that gates every action on them, and the state changelog that hands a partition's
//! state to its next owner (its Kafka I/O: [`changelog`]; its record format: [`crate::state::changelog`]).
//!
//! # Who acts on a partition
//! The group coordinator assigns each CDC partition to one member. An instance polls Stripe,
//! emits status events and writes the changelog for a partition only while
//! [`Ownership::may_act`] says so:
//! - the partition is in its current assignment (added after the takeover below, removed first
//!   thing in a revoke, before the revoke's checkpoint), and
//! - with `--changelog`, its **group lease** is fresh: a generation-checked offset commit
//!   succeeded less than half a `session.timeout.ms` ago. The coordinator rejects commits from
//!   a member of an old generation or one it expelled (`ILLEGAL_GENERATION`,
//!   `UNKNOWN_MEMBER_ID`), and it moves a live member's partitions only after that member
//!   revoked them or missed its session timeout, which a commit renews. So while the lease
//!   holds, no other member has been given the partition.
//!
//! A **zombie** (an instance paused, by GC, SIGSTOP or a stalled VM, past its session timeout,
//! then resumed) wakes with a lapsed lease: its poller neither calls Stripe nor emits, its
//! checkpoints write nothing to the changelog, and its first commit fails, after which
//! librdkafka reports the assignment lost. What is left: an action that passed its lease check
//! before the pause and is carried out after it (a status event already handed to the producer,
//! a changelog batch being written). Closing that needs the broker to fence the producer
//! (transactions); the dev broker shows aborted transactions to `read_committed` readers, so
//! it is not used. Such a late status event carries the same deterministic `event_id` and a
//! final Stripe answer, and the updater only moves `pending` rows: a duplicate, never a wrong
//! write. A late changelog record is an older view of a payment; restoring it can bring back a
//! payment already resolved (polled once more, then dropped when its row's change is seen
//! again), never lose one.
//!
//! # Taking a partition over (on assign)
//! With `--changelog`, before a newly assigned partition is read or polled:
//! - its changelog's end equals the position this store last wrote: local state is current and
//!   is used as it is (a restart, or a partition that came back untouched);
//! - its changelog is empty: this store's entries of the partition (state built before the
//!   changelog existed, or by `replay`) are adopted, logged whole at the next checkpoint;
//! - otherwise another instance wrote last: local entries of the partition are dropped and the
//!   changelog is read from its beginning to its end; the CDC partition resumes at the offset
//!   its last marker names (no full replay of the CDC topic).
//!
//! Local partitions an assignment does not include are evicted then (their changelog holds
//! them), so state on disk follows the partitions.

pub mod changelog;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::clock::Clock;

/// librdkafka's default `session.timeout.ms`, used when `--kafka-option` does not set one.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

/// The session timeout the consumer runs with (`--kafka-option session.timeout.ms=…`).
pub fn session_timeout(kafka_options: &[(String, String)]) -> Duration {
    kafka_options
        .iter()
        .rev()
        .find(|(k, _)| k == "session.timeout.ms")
        .and_then(|(_, v)| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_SESSION_TIMEOUT)
}

/// The CDC partitions this instance owns, and its group lease (see the module doc).
pub struct Ownership {
    /// Partitions polled and emitted for.
    acting: RwLock<HashSet<i32>>,
    /// Partitions whose changes may be logged: `acting`, plus those being revoked until their
    /// last checkpoint is written.
    logging: RwLock<HashSet<i32>>,
    /// Lease length; `None`: no lease (one instance alone, no changelog).
    lease: Option<u64>,
    /// End of the lease (clock ms); 0: none.
    lease_until: AtomicU64,
    /// Owns every partition, assigned or not (`replay`: no group).
    all: bool,
    /// Polls under way per partition (past their ownership check, result not yet recorded):
    /// a revoke waits for them, so their answers are recorded and logged by this owner instead
    /// of the next owner asking Stripe again at once.
    busy: Mutex<HashMap<i32, usize>>,
    clock: Clock,
}

/// A poll under way on an owned partition (see [`Ownership::begin_poll`]).
pub struct PollGuard<'a> {
    ownership: &'a Ownership,
    partition: i32,
}

impl PollGuard<'_> {
    /// Whether the poll's answer may still be recorded and emitted: the partition is not
    /// released (a revoke waits for this poll) and the lease holds.
    pub fn may_finish(&self) -> bool {
        let o = self.ownership;
        o.all || (o.logs(self.partition) && o.lease_holds())
    }
}

impl PollGuard<'_> {
    /// Whether the partition is still this instance's (not released), lease or not.
    pub fn still_assigned(&self) -> bool {
        self.ownership.all || self.ownership.logs(self.partition)
    }
}

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.ownership.busy.lock().expect("ownership");
        if let Some(n) = busy.get_mut(&self.partition) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.partition);
            }
        }
    }
}

impl Ownership {
    /// Owns what it is assigned; no lease (without `--changelog`).
    pub fn unleased(clock: Clock) -> Self {
        Ownership {
            acting: RwLock::default(),
            logging: RwLock::default(),
            lease: None,
            lease_until: AtomicU64::new(0),
            all: false,
            busy: Mutex::default(),
            clock,
        }
    }

    /// Owns every partition (`replay` polls what it read, with no group).
    pub fn all(clock: Clock) -> Self {
        Ownership {
            all: true,
            ..Ownership::unleased(clock)
        }
    }

    /// Owns what it is assigned while its lease, half of `session_timeout`, holds.
    pub fn leased(clock: Clock, session_timeout: Duration) -> Self {
        Ownership {
            lease: Some(session_timeout.as_millis() as u64 / 2),
            ..Ownership::unleased(clock)
        }
    }

    pub fn is_leased(&self) -> bool {
        self.lease.is_some()
    }

    fn lease_holds(&self) -> bool {
        self.lease.is_none() || self.clock.now_ms() < self.lease_until.load(Ordering::Acquire)
    }

    /// Whether this instance may poll, emit and log for `partition` now.
    pub fn may_act(&self, partition: i32) -> bool {
        self.all
            || (self.acting.read().expect("ownership").contains(&partition) && self.lease_holds())
    }

    /// Starts a poll of a payment of `partition` if this instance may act on it.
    pub fn begin_poll(&self, partition: i32) -> Option<PollGuard<'_>> {
        // Counted under the read lock: a `stop_acting` (write lock) that follows sees it.
        let acting = self.acting.read().expect("ownership");
        if !(self.all || (acting.contains(&partition) && self.lease_holds())) {
            return None;
        }
        *self
            .busy
            .lock()
            .expect("ownership")
            .entry(partition)
            .or_default() += 1;
        Some(PollGuard {
            ownership: self,
            partition,
        })
    }

    /// Waits (blocking) until no poll of `partitions` is under way, at most `limit`. Returns
    /// whether they finished; answers arriving later are dropped (`release` came first).
    pub fn wait_idle(&self, partitions: &[i32], limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            let busy = {
                let b = self.busy.lock().expect("ownership");
                partitions.iter().any(|p| b.contains_key(p))
            };
            if !busy {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether any partition is owned (the poller idles otherwise).
    pub fn owns_any(&self) -> bool {
        self.all || !self.acting.read().expect("ownership").is_empty()
    }

    pub fn acting(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .acting
            .read()
            .expect("ownership")
            .iter()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// The lease, renewed by a generation-checked group request sent at `sent_ms` that
    /// succeeded: the coordinator kept the session alive from then on.
    pub fn renew(&self, sent_ms: u64) {
        if let Some(len) = self.lease {
            self.lease_until
                .fetch_max(sent_ms.saturating_add(len), Ordering::AcqRel);
        }
    }

    /// The lease, renewed now (an assignment just came from the coordinator).
    pub fn renew_now(&self) {
        self.renew(self.clock.now_ms());
    }

    /// Takes `partitions` on (after their state is in place).
    pub fn acquire(&self, partitions: &[i32]) {
        self.logging
            .write()
            .expect("ownership")
            .extend(partitions.iter().copied());
        self.acting
            .write()
            .expect("ownership")
            .extend(partitions.iter().copied());
    }

    /// First step of a revoke: no more polls or emissions for `partitions`; their changes may
    /// still be logged by the revoke's checkpoint.
    pub fn stop_acting(&self, partitions: &[i32]) {
        let mut a = self.acting.write().expect("ownership");
        for p in partitions {
            a.remove(p);
        }
    }

    /// Last step of a revoke, or all of a loss: nothing of `partitions` is ours any more.
    pub fn release(&self, partitions: &[i32]) {
        self.stop_acting(partitions);
        let mut l = self.logging.write().expect("ownership");
        for p in partitions {
            l.remove(p);
        }
    }

    fn logs(&self, partition: i32) -> bool {
        self.logging.read().expect("ownership").contains(&partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn nothing_is_acted_on_once_the_lease_lapses() {
        let clock = Clock::new();
        let own = Ownership::leased(clock, Duration::from_secs(6));
        own.acquire(&[0, 1]);
        // Assigned, but no lease yet.
        assert!(!own.may_act(0));
        own.renew_now();
        assert!(own.may_act(0) && own.may_act(1) && !own.may_act(2));
        let guard = own.begin_poll(0).expect("owned and leased");
        // Half the session later, with no renewal: a paused (zombie) instance wakes here.
        tokio::time::advance(Duration::from_millis(3_001)).await;
        assert!(!own.may_act(0));
        assert!(own.begin_poll(1).is_none());
        assert!(
            !guard.may_finish(),
            "an answer that arrives now is not acted on"
        );
        assert!(guard.still_assigned(), "but the partition was not released");
        own.renew(clock.now_ms());
        assert!(own.may_act(0) && guard.may_finish());
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoke_waits_for_polls_under_way_and_lets_them_finish() {
        let own = Ownership::unleased(Clock::new());
        own.acquire(&[3]);
        let guard = own.begin_poll(3).unwrap();
        own.stop_acting(&[3]);
        assert!(
            own.begin_poll(3).is_none(),
            "no new poll once the revoke began"
        );
        assert!(
            guard.may_finish(),
            "the poll under way still records its answer"
        );
        assert!(!own.wait_idle(&[3], Duration::from_millis(30)));
        drop(guard);
        assert!(own.wait_idle(&[3], Duration::from_millis(30)));
        own.release(&[3]);
        assert!(!own.may_act(3));
        let late = PollGuard {
            ownership: &own,
            partition: 3,
        };
        assert!(!late.may_finish() && !late.still_assigned());
    }
}
