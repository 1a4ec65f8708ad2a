//! Where changes come from. Every source feeds the same [`Pipeline`] and owns two things the
//! pipeline does not know: how messages arrive, and what happens to its positions once a
//! checkpoint made them durable.
//!
//! | source | reads | position | once durable |
//! |---|---|---|---|
//! | [`kafka::KafkaSource`] | the Debezium topic, in a consumer group | offset per partition | commit to the group |
//! | [`postgres::PgSource`] | the table's logical replication (embedded mode) | the slot's LSN | acknowledge to the slot |
//! | [`file::FileSource`] | files of message values (`paystream replay`) | line per file | nothing |
//!
//! Adding a source: a module here implementing [`Source`], and one arm in `run`'s constructor
//! match (`crate::run`); everything after the constructor is shared.

pub mod file;
pub mod kafka;
pub mod postgres;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use crate::pipeline::Pipeline;
use crate::scaleout::changelog::HandoffError;
use crate::scaleout::Ownership;
use crate::state::{Position, StateError};

/// One source of change events, as `run` supervises it: start once, run until shutdown,
/// checkpoint on a timer beside the run (and once at the end).
pub trait Source: Send + Sync + 'static {
    /// Whether the store's recovery check must pass before [`Source::start`]: a start that
    /// writes state (a snapshot) needs it; otherwise the check runs beside the start and the
    /// first checkpoint waits for it.
    const CHECK_BEFORE_START: bool;

    /// Readies the source before anything is read. Most sources are ready once built.
    fn start(
        &self,
        pipeline: &Pipeline,
        shutdown: &mut watch::Receiver<bool>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send {
        let _ = (pipeline, shutdown);
        async { Ok(()) }
    }

    /// Feeds changes into `pipeline` until shutdown (`Ok`), the input ends (`Ok`), or a fatal
    /// error.
    fn run(
        &self,
        pipeline: &Pipeline,
        shutdown: watch::Receiver<bool>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// One checkpoint ([`Pipeline::checkpoint`]), then the hand-off of its positions. A
    /// retryable error (see [`StateError::retryable`]) leaves the changes in memory for the
    /// next checkpoint.
    fn checkpoint(
        &self,
        pipeline: &Pipeline,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// The last checkpoint, at a clean stop: everything read becomes durable and is handed
    /// on, with nothing deferred to a next checkpoint.
    fn final_checkpoint(
        &self,
        pipeline: &Pipeline,
    ) -> impl Future<Output = Result<(), StateError>> + Send {
        self.checkpoint(pipeline)
    }

    /// Whether the source delivers now (readiness): the reason when it does not.
    fn ready(&self) -> Result<(), String>;

    /// Which payments this instance may poll: all of them, or the partitions it owns.
    fn ownership(&self) -> Arc<Ownership>;

    /// Whether a stored position is one this source reads (a `replay` into the same data dir,
    /// or the events feed, keeps its own beside it).
    fn owns_position(&self, at: &Position) -> bool;
}

/// Why a source stopped or could not start. Each says who is at fault.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The local disk: fix it, then restart.
    #[error(transparent)]
    State(#[from] StateError),
    /// librdkafka refused the consumer's configuration (a `--kafka-option`): the operator.
    #[error("kafka consumer setup failed")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// No broker answered at start: retry helps once the brokers are reachable.
    #[error(transparent)]
    KafkaUnreachable(#[from] crate::kafka::Unreachable),
    /// A newly assigned partition's state could not be made current (scale-out): its
    /// changelog is unreachable or unreadable. The daemon stops; the group gives the partition
    /// to another member, or back to this one after a restart.
    #[error("partition takeover failed")]
    Takeover(#[source] HandoffError),
    /// Embedded mode: the message says whether the server, the setup or the slot is at fault.
    #[error(transparent)]
    Postgres(Box<postgres::PgSourceError>),
    /// An input file of `replay` could not be read: the operator (path, permissions) or the
    /// disk.
    #[error("cannot read {path}")]
    Input {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl SourceError {
    /// Whether starting again later may succeed without anyone changing anything.
    pub fn retryable(&self) -> bool {
        match self {
            SourceError::State(e) => e.retryable(),
            SourceError::KafkaUnreachable(_) | SourceError::Takeover(_) => true,
            SourceError::Postgres(e) => e.retryable(),
            SourceError::Kafka(_) | SourceError::Input { .. } => false,
        }
    }
}

impl From<postgres::PgSourceError> for SourceError {
    fn from(e: postgres::PgSourceError) -> Self {
        SourceError::Postgres(Box::new(e))
    }
}
