//! `paystream run`: wires source → state → poller → sink, checkpoints, and shuts down cleanly.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::admin;
use crate::clock::Clock;
use crate::config::{RunConfig, SinkKind, SourceKind};
use crate::metrics::events::{emit, CheckpointDeferred};
use crate::metrics::{self, METRICS};
use crate::pipeline::{Health, Pipeline};
use crate::poll::ratelimit::{Budgets, RateLimiter};
use crate::poll::stripe::{LookupError, StripeApi};
use crate::poll::{Poller, PollerConfig};
use crate::scaleout::Ownership;
use crate::sink::{DeadLetterFile, DeadLetters, Sink, StatusEncoding, StatusFormat, StatusSink};
use crate::source::kafka::{KafkaSettings, KafkaSource};
use crate::source::postgres::{PgSource, PgSourceSettings};
use crate::source::{Source, SourceError};
use crate::state::{StateError, Store};

/// Why the daemon stopped with an error. Each says who is at fault. A variant wrapping a source
/// does not repeat it in its own text: the binary prints the whole chain (`{:#}`).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Local disk: fix it, then restart; state is never run on half-saved.
    #[error(transparent)]
    State(#[from] StateError),
    /// librdkafka refused the status producer's configuration (a `--kafka-option`).
    #[error("kafka producer setup failed")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The source could not start or stopped: its error says who is at fault.
    #[error(transparent)]
    Source(SourceError),
    #[error("stripe client setup failed")]
    Stripe(#[from] LookupError),
    #[error("admin endpoint")]
    Admin(#[from] std::io::Error),
    /// Registering the status schema failed (`--status-format avro`): the registry is down
    /// (retry helps) or refused the schema (the operator must look).
    #[error("status schema registration")]
    Registry(#[from] crate::decode::registry::RegistryError),
    /// `--sink postgres` could not reach or check the table at start.
    #[error("status write-back (--sink postgres)")]
    Writer(Box<crate::sink::postgres::WriteError>),
}

impl RunError {
    /// Whether starting again later may succeed without anyone changing anything (a
    /// supervisor's restart policy can follow it).
    pub fn retryable(&self) -> bool {
        match self {
            RunError::State(e) => e.retryable(),
            RunError::Source(e) => e.retryable(),
            RunError::Stripe(e) => e.retryable(),
            RunError::Registry(e) => e.retryable(),
            RunError::Writer(e) => e.retryable(),
            RunError::Config(_) | RunError::Kafka(_) | RunError::Admin(_) => false,
        }
    }
}

impl From<crate::sink::postgres::WriteError> for RunError {
    fn from(e: crate::sink::postgres::WriteError) -> Self {
        RunError::Writer(Box::new(e))
    }
}

impl From<SourceError> for RunError {
    fn from(e: SourceError) -> Self {
        match e {
            // A state error is the same fault whichever part met it.
            SourceError::State(e) => RunError::State(e),
            e => RunError::Source(e),
        }
    }
}

/// Runs until `shutdown` turns true (SIGTERM/SIGINT in the binary), then stops fetching, lets
/// in-flight polls finish briefly, writes a final checkpoint and returns.
pub async fn run(cfg: RunConfig, external: watch::Receiver<bool>) -> Result<(), RunError> {
    cfg.validate()?;
    let clock = Clock::new();
    metrics::init_run_series();
    crate::decode::init_series();
    crate::state::init_series();
    // The recovery check (a full scan: about 5 s at a million entries) runs beside the start,
    // not before it; the checkpoint task waits for it (see `Store::check`).
    // Opening reads sled's log and may flush: on the blocking pool, like every disk access.
    let dir = cfg.data_dir.clone();
    let state = Arc::new(
        tokio::task::spawn_blocking(move || Store::open_unchecked(&dir))
            .await
            .expect("state open task")?,
    );
    let check = {
        let st = state.clone();
        tokio::task::spawn_blocking(move || st.check())
    };
    let interval_ms = cfg.poll_interval.as_millis() as u64;
    crate::state::blocking(&state, move |s| s.record_poll_interval(interval_ms)).await?;
    let health = Arc::new(Health::default());
    health
        .last_checkpoint_ms
        .store(clock.now_ms(), Ordering::Relaxed);

    // Polls that fell due while we were down are spread over the time the rate budget needs
    // for them (at most one interval), most overdue first, instead of firing at once.
    let rps = cfg.stripe_rps;
    // The spread becomes durable at the first checkpoint; a crash before it spreads again.
    let now = clock.now_ms();
    let moved = crate::state::blocking(&state, move |s| {
        s.spread_overdue(now, |n| ((n as f64 / rps * 1000.0) as u64).min(interval_ms))
    })
    .await?;
    if moved > 0 {
        tracing::info!(overdue = moved, "spread overdue polls after restart");
    }
    // The state gauges need a full scan (seconds at a million entries): computed beside the
    // start, not before it; the periodic job refreshes them after.
    let stale_ms = cfg.stale_after.as_millis() as u64;
    tokio::spawn(refresh_state_gauges(
        state.clone(),
        clock,
        interval_ms,
        stale_ms,
    ));
    tracing::info!(entries = state.entry_count(), data_dir = %cfg.data_dir.display(), "state opened");

    // Readiness: the source's own facts (once it exists), then checkpoints that keep coming.
    let source_ready: Arc<OnceLock<Readiness>> = Arc::new(OnceLock::new());
    let (ready_health, ready_source) = (health.clone(), source_ready.clone());
    let stale_after = (cfg.checkpoint_interval * 3 + Duration::from_secs(5)).as_millis() as u64;
    let bound = admin::serve(
        cfg.metrics_addr,
        Arc::new(move || {
            match ready_source.get() {
                Some(ready) => ready()?,
                None => return Err("source not started yet".into()),
            }
            let age = clock
                .now_ms()
                .saturating_sub(ready_health.last_checkpoint_ms.load(Ordering::Relaxed));
            if age > stale_after {
                return Err(if ready_health.checked.load(Ordering::Relaxed) {
                    format!("last checkpoint {age} ms ago")
                } else {
                    format!("state recovery check still running ({age} ms)")
                });
            }
            Ok(())
        }),
        Some(Arc::new(admin::StateApi {
            store: state.clone(),
            data_dir: std::fs::canonicalize(&cfg.data_dir)?,
            poll_interval: cfg.poll_interval,
            stale_after: cfg.stale_after,
            pending_status: cfg.decode.columns.pending_status.clone(),
            clock,
        })),
    )
    .await?;
    tracing::info!(addr = %bound, "admin endpoint listening");

    let decoder = crate::decode::Decoder::new(cfg.decode.decoder_settings());
    let (api, status_sink, dead_letters) = stripe_and_sinks(&cfg, &decoder).await?;
    let pipeline = Arc::new(Pipeline {
        state: state.clone(),
        dead_letters,
        decoder,
        pending_status: cfg.decode.columns.pending_status.clone(),
        // A new payment's first poll: with the events feed, the feed reports its resolution,
        // so the first retrieve is the fallback's (see `poll::feed`).
        poll_interval: if cfg.events_feed {
            cfg.fallback_poll_interval
        } else {
            cfg.poll_interval
        },
        clock,
        health,
    });
    let parts = Parts {
        pipeline,
        check,
        api,
        status_sink,
        source_ready,
    };

    // The one place that knows the kinds of source: everything after the constructor is
    // shared (`supervise`).
    match cfg.source {
        SourceKind::Kafka => {
            let settings = KafkaSettings {
                brokers: cfg.kafka.brokers.clone(),
                options: cfg.kafka.kafka_options.clone(),
                group_id: cfg.group_id.clone(),
                topic: cfg.cdc_topic.clone(),
                changelog: cfg.changelog,
                startup_timeout: cfg.kafka.kafka_startup_timeout,
                renew_every: cfg.checkpoint_interval,
            };
            let src = KafkaSource::new(settings, state, clock)?;
            supervise(src, &cfg, parts, external).await
        }
        SourceKind::Postgres => {
            let settings = PgSourceSettings {
                url: cfg.postgres_url().to_string(),
                slot: cfg.slot.clone(),
                publication: cfg.publication.clone(),
                table: cfg.table.clone(),
                pending_status: cfg.decode.columns.pending_status.clone(),
                resnapshot: cfg.resnapshot,
                decode: cfg.decode.options(),
            };
            let src = PgSource::new(settings, state, clock);
            supervise(src, &cfg, parts, external).await
        }
    }
}

/// How long a checkpoint waits after the first change, so a burst becomes one batch.
const CHECKPOINT_LINGER: Duration = Duration::from_millis(5);
/// The least time between the starts of two checkpoints: at most 40 a second (each ends in an
/// fsync), whatever the load.
const CHECKPOINT_MIN_GAP: Duration = Duration::from_millis(25);

/// A source's readiness, as the admin endpoint asks it.
type Readiness = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What `run` builds before the source, for `supervise`.
struct Parts {
    pipeline: Arc<Pipeline>,
    /// The store's recovery check, running.
    check: tokio::task::JoinHandle<Result<(), StateError>>,
    api: Arc<StripeApi>,
    status_sink: Arc<StatusSink>,
    source_ready: Arc<OnceLock<Readiness>>,
}

/// Starts `src`, the poller, the scheduled jobs and the checkpoint loop; runs until shutdown or
/// the first fatal error; then stops every part and writes a final checkpoint.
async fn supervise<S: Source>(
    src: S,
    cfg: &RunConfig,
    parts: Parts,
    mut external: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let Parts {
        pipeline,
        check,
        api,
        status_sink,
        source_ready,
    } = parts;
    let (state, health, clock) = (
        pipeline.state.clone(),
        pipeline.health.clone(),
        pipeline.clock,
    );
    // One internal stop signal: set by the caller's shutdown or by any part failing.
    let (stop, shutdown) = watch::channel(false);
    let src = Arc::new(src);
    // Weak: the admin endpoint must not keep the source alive past the end of `supervise`,
    // where dropping it leaves the consumer group (its partitions move at once).
    let ready_src = Arc::downgrade(&src);
    let _ = source_ready.set(Box::new(move || match ready_src.upgrade() {
        Some(src) => src.ready(),
        None => Err("source stopped".into()),
    }));
    // The offset gauges start from what is durable; checkpoints update the partitions they move.
    // Only this source's: a `replay` into this data dir keeps its own position beside them.
    for (at, offset) in state
        .positions()?
        .into_iter()
        .filter(|(at, _)| src.owns_position(at))
    {
        METRICS
            .stored_offset
            .with_label_values(&[&at.partition().to_string()])
            .set(offset);
    }

    // A source whose start writes state (the Postgres snapshot) waits for the recovery check;
    // otherwise the check runs beside the start and the checkpoint task waits for it.
    let mut check = Some(check);
    if S::CHECK_BEFORE_START {
        check
            .take()
            .expect("check")
            .await
            .expect("recovery check task")?;
        health.checked.store(true, Ordering::Relaxed);
    }
    let mut start_shutdown = shutdown.clone();
    tokio::select! {
        r = src.start(&pipeline, &mut start_shutdown) => r?,
        _ = external.changed() => return Ok(()),
    }
    health
        .last_checkpoint_ms
        .store(clock.now_ms(), Ordering::Relaxed);

    let poller = Arc::new(poller(
        cfg,
        state.clone(),
        api,
        status_sink,
        clock,
        src.ownership(),
    ));
    let poller_task = tokio::spawn(poller.clone().run(shutdown.clone()));
    let sched = schedule(cfg, &state, &poller, clock).await;

    // The checkpoint loop runs beside the source; both stop on shutdown or on a state error.
    let (cp_source, cp_pipeline) = (src.clone(), pipeline.clone());
    let mut cp_shutdown = shutdown.clone();
    let every = cfg.checkpoint_interval;
    // With scale-out every checkpoint with changes also writes the state changelog (records
    // and a marker per partition), which a takeover reads back: there, checkpoints keep the
    // fixed interval, so the changelog does not grow with how often work arrives.
    let on_work = !cfg.changelog;
    let checkpoints = tokio::spawn(async move {
        // First the recovery check (if still running): it holds the checkpoint lock, and no
        // checkpoint may write to a store before it passed. A failed check stops the daemon
        // like a failed checkpoint. Polls and events go on meanwhile: nothing they do needs
        // the check, and nothing is durable or committed before it.
        if let Some(check) = check {
            check.await.expect("recovery check task")?;
            cp_pipeline.health.checked.store(true, Ordering::Relaxed);
        }
        // A checkpoint starts as soon as there is work (after a short linger that gathers a
        // burst into one batch, and no sooner than `CHECKPOINT_MIN_GAP` after the last one
        // started), and at least every `--checkpoint-interval` (readiness needs a recent one).
        // Under load they run back to back, each taking what arrived during the last: the
        // batch grows with the load, and a change waits about one checkpoint to be durable,
        // not a fixed tick. The group's offsets are committed at most once an interval (see
        // `source::kafka`), so the broker sees no more commits than before.
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let state = cp_pipeline.state.clone();
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = state.changed(), if on_work => {
                    tokio::time::sleep_until(
                        (tokio::time::Instant::now() + CHECKPOINT_LINGER).max(last + CHECKPOINT_MIN_GAP),
                    )
                    .await
                }
                _ = tick.tick() => {}
                // A reader waiting for room (see `pipeline::MAX_UNWRITTEN`): with `--changelog`
                // too, since the wait would otherwise last the rest of the interval.
                _ = state.full() => {}
                _ = cp_shutdown.changed() => return Ok::<(), StateError>(()),
            }
            last = tokio::time::Instant::now();
            match cp_source.checkpoint(&cp_pipeline).await {
                Ok(()) => {}
                // The changelog's broker (or the lease) failed: nothing was written; the
                // changes wait in memory for the next tick. Readiness turns stale meanwhile.
                Err(e) if e.retryable() => emit(CheckpointDeferred { error: &e }),
                Err(e) => return Err(e),
            }
        }
    });

    let result: Result<(), RunError> = tokio::select! {
        r = src.run(&pipeline, shutdown.clone()) => r.map_err(RunError::from),
        r = checkpoints => r.expect("checkpoint task").map_err(RunError::from),
        _ = external.changed() => Ok(()),
    };
    // Whatever ended the loop, stop every part, then make the last work durable.
    let _ = stop.send(true);
    if let Err(e) = &result {
        // `retryable`: whether a restart alone may help (a supervisor can alert on false).
        tracing::error!(error = %e, retryable = e.retryable(), "stopping on an error");
    }
    let poll_result = poller_task.await.expect("poller task");
    if result.is_ok() && poll_result.is_ok() {
        match src.final_checkpoint(&pipeline).await {
            Ok(()) => tracing::info!("final checkpoint written"),
            // Not lost: the changes since the last checkpoint are read again from the source
            // (for Kafka by the partition's next owner, which may poll again and emit the same
            // event_id: see `source::kafka`, "Revokes").
            Err(e) if e.retryable() => {
                tracing::warn!(error = %e, "final checkpoint not written; the next start replays since the last one")
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(mut s) = sched {
        let _ = s.shutdown().await;
    }
    // Dropping the consumer leaves the group; done off the runtime since librdkafka may block.
    let _ = tokio::task::spawn_blocking(move || drop(src)).await;
    result?;
    poll_result?;
    Ok(())
}

/// The periodic jobs: the state gauges, and the events feed's cycles (`--events-feed`).
async fn schedule(
    cfg: &RunConfig,
    state: &Arc<Store>,
    poller: &Arc<Poller>,
    clock: Clock,
) -> Option<tokio_cron_scheduler::JobScheduler> {
    let (interval_ms, stale_ms) = (
        cfg.poll_interval.as_millis() as u64,
        cfg.stale_after.as_millis() as u64,
    );
    // State gauges (counts, ages, polls due) are a full scan: refreshed by a periodic job, off
    // the hot path. Known gap: at a million entries the scan costs about a second of one core
    // per run (issue 23: counters kept at write time would replace it).
    let mut sched = tokio_cron_scheduler::JobScheduler::new().await.ok();
    if let Some(s) = sched.as_mut() {
        let st = state.clone();
        let job =
            tokio_cron_scheduler::Job::new_repeated_async(cfg.state_stats_interval, move |_, _| {
                Box::pin(refresh_state_gauges(
                    st.clone(),
                    clock,
                    interval_ms,
                    stale_ms,
                ))
            });
        if let Ok(job) = job {
            let _ = s.add(job).await;
        }
        if cfg.events_feed {
            // The events feed: one cycle now, then one every half poll interval, so a
            // resolution waits at most half an interval for the cycle that finds it, and the
            // cycle's own time fits in the other half. A cycle still running when the next is
            // due makes that one wait (the cursor's lock), never overlap.
            tokio::spawn(feed_cycle(poller.clone()));
            let p = poller.clone();
            let every = Duration::from_secs((cfg.poll_interval.as_secs() / 2).max(1));
            let job = tokio_cron_scheduler::Job::new_repeated_async(every, move |_, _| {
                Box::pin(feed_cycle(p.clone()))
            });
            match job {
                Ok(job) => {
                    let _ = s.add(job).await;
                }
                Err(e) => tracing::error!(error = %e, "events feed job not scheduled"),
            }
        }
        let _ = s.start().await;
    }
    sched
}

/// One cycle of the events feed. Stripe's errors are counted and logged inside (the next
/// cycle reads again); a state error also stops the poller, and with it the daemon.
async fn feed_cycle(p: Arc<crate::poll::Poller>) {
    if let Err(e @ crate::poll::feed::FeedError::State(_)) = p.reconcile().await {
        tracing::error!(error = %e, "events feed cycle failed on the state store");
    }
}

/// Recomputes the state gauges from the store's tally (no scan), on a blocking thread.
async fn refresh_state_gauges(state: Arc<Store>, clock: Clock, interval_ms: u64, stale_ms: u64) {
    let now = clock.now_ms();
    match crate::state::blocking(&state, move |s| s.stats(now, interval_ms, stale_ms)).await {
        Ok(s) => crate::state::set_gauges(&s, now),
        // The counts are known once the recovery check beside the start has passed.
        Err(crate::state::StateError::Unchecked { .. }) => {}
        Err(e) => tracing::error!(error = %e, "state gauges not refreshed"),
    }
}

/// The Stripe client, where final answers go (`--sink`) and where undecodable changes go: the
/// Kafka dead-letter topic whenever Kafka is in use, else a JSON-lines file in the data dir.
/// With `--status-format avro` the status schema is registered (or found) first, through the
/// decoder's registry client.
pub(crate) async fn stripe_and_sinks(
    cfg: &RunConfig,
    decoder: &crate::decode::Decoder,
) -> Result<(Arc<StripeApi>, Arc<StatusSink>, DeadLetters), RunError> {
    let key = cfg
        .stripe_key
        .as_ref()
        .map(|k| k.expose().to_string())
        .unwrap_or_default();
    let api = Arc::new(StripeApi::new(
        &cfg.stripe_api_base,
        &key,
        cfg.stripe_timeout,
        cfg.stripe_account.as_deref(),
    )?);
    let kafka = if cfg.uses_kafka() {
        let encoding = match (cfg.status_format, &decoder.registry) {
            (StatusFormat::Avro, Some(registry)) => {
                StatusEncoding::avro(registry, &cfg.status_topic).await?
            }
            _ => StatusEncoding::Json,
        };
        Some(Arc::new(
            Sink::new(
                &cfg.kafka.brokers,
                &cfg.kafka.kafka_options,
                &cfg.status_topic,
                &cfg.dlq_topic,
            )?
            .with_status_encoding(encoding),
        ))
    } else {
        None
    };
    let status = match (cfg.sink, &kafka) {
        (SinkKind::Kafka, Some(sink)) => StatusSink::Kafka(sink.clone()),
        (SinkKind::Kafka, None) => unreachable!("--sink kafka uses Kafka"),
        (SinkKind::Postgres, _) => StatusSink::Postgres(Box::new(
            crate::sink::postgres::Writer::connect(
                cfg.postgres_url(),
                &cfg.table,
                &cfg.decode.columns.write_columns(),
            )
            .await?,
        )),
    };
    let dead_letters = match kafka {
        Some(sink) => DeadLetters::Kafka(sink),
        None => DeadLetters::File(DeadLetterFile::new(cfg.data_dir.join("dead-letters.jsonl"))),
    };
    Ok((api, Arc::new(status), dead_letters))
}

/// The poll scheduler as `run` configures it.
pub(crate) fn poller(
    cfg: &RunConfig,
    state: Arc<Store>,
    api: Arc<StripeApi>,
    sink: Arc<StatusSink>,
    clock: Clock,
    ownership: Arc<Ownership>,
) -> Poller {
    Poller::new(
        state,
        api,
        sink,
        Budgets {
            requests: RateLimiter::new(cfg.stripe_rps)
                .with_gauge(METRICS.stripe_rate_limit.clone()),
            search: RateLimiter::new(cfg.stripe_search_rps),
        },
        clock,
        PollerConfig {
            interval: cfg.poll_interval,
            concurrency: cfg.stripe_concurrency,
            retry_backoff: cfg.retry_backoff,
            rate_limit_cooldown: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(5),
            fallback_interval: cfg.events_feed.then_some(cfg.fallback_poll_interval),
            feed_overlap: cfg.events_feed_overlap,
            stale_after: cfg.stale_after,
            stale_interval: cfg.stale_poll_interval,
            cancel_abandoned_after: cfg.cancel_abandoned_after,
        },
        ownership,
    )
}
