//! `paystream run`: wires source → state → poller → sink, checkpoints, and shuts down cleanly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::admin;
use crate::clock::Clock;
use crate::config::{RunConfig, SinkKind, SourceKind};
use crate::metrics::{self, METRICS};
use crate::poll::ratelimit::{Budgets, RateLimiter};
use crate::poll::stripe::{LookupError, StripeApi};
use crate::poll::{Poller, PollerConfig};
use crate::scaleout::changelog::KafkaChangelog;
use crate::scaleout::{self, Ownership};
use crate::sink::{DeadLetterFile, DeadLetters, Sink, StatusEncoding, StatusFormat, StatusSink};
use crate::source::postgres::{PgSource, PgSourceError, PgSourceSettings};
use crate::source::{self, CdcConsumer, Health, Pipeline};
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
    #[error("kafka client setup failed")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    KafkaUnreachable(#[from] crate::kafka::Unreachable),
    #[error("stripe client setup failed")]
    Stripe(#[from] LookupError),
    #[error("admin endpoint")]
    Admin(#[from] std::io::Error),
    /// Registering the status schema failed (`--status-format avro`): the registry is down
    /// (retry helps) or refused the schema (the operator must look).
    #[error("status schema registration")]
    Registry(#[from] crate::decode::registry::RegistryError),
    /// Embedded mode's source: the message says whether the server, the setup or the slot is
    /// at fault.
    #[error(transparent)]
    Postgres(Box<PgSourceError>),
    /// `--sink postgres` could not reach or check the table at start.
    #[error("status write-back (--sink postgres)")]
    Writer(Box<crate::sink::postgres::WriteError>),
}

impl From<crate::sink::postgres::WriteError> for RunError {
    fn from(e: crate::sink::postgres::WriteError) -> Self {
        RunError::Writer(Box::new(e))
    }
}

impl From<PgSourceError> for RunError {
    fn from(e: PgSourceError) -> Self {
        RunError::Postgres(Box::new(e))
    }
}

/// Where changes come from, as far as checkpoints care: what a checkpoint's positions are
/// handed to once durable.
#[derive(Clone)]
enum Source {
    /// Offsets are committed to the consumer group (see `source`).
    Kafka(Arc<CdcConsumer>),
    /// The LSN is acknowledged to the slot (see `source::postgres`).
    Postgres(Arc<PgSource>),
}

impl Source {
    async fn checkpoint(
        &self,
        state: &Arc<Store>,
        health: &Health,
        clock: &Clock,
    ) -> Result<(), StateError> {
        match self {
            Source::Kafka(c) => source::checkpoint_and_commit(state, c, health, clock).await,
            Source::Postgres(pg) => pg.checkpoint(health, clock).await,
        }
    }
}

/// Runs until `shutdown` turns true (SIGTERM/SIGINT in the binary), then stops fetching, lets
/// in-flight polls finish briefly, writes a final checkpoint and returns.
pub async fn run(cfg: RunConfig, mut external: watch::Receiver<bool>) -> Result<(), RunError> {
    cfg.validate()?;
    // One internal stop signal: set by the caller's shutdown or by any part failing.
    let (stop, shutdown) = watch::channel(false);
    let clock = Clock::new();
    metrics::init_run_series();
    crate::decode::init_series();
    crate::state::init_series();
    // The recovery check (a full scan: about 5 s at a million entries) runs beside the start,
    // not before it; the checkpoint task waits for it (see `Store::check`).
    let state = Arc::new(Store::open_unchecked(&cfg.data_dir)?);
    let check = {
        let st = state.clone();
        tokio::task::spawn_blocking(move || st.check())
    };
    state.record_poll_interval(cfg.poll_interval.as_millis() as u64)?;
    let health = Arc::new(Health::default());
    health
        .last_checkpoint_ms
        .store(clock.now_ms(), Ordering::Relaxed);

    // Polls that fell due while we were down are spread over the time the rate budget needs
    // for them (at most one interval), most overdue first, instead of firing at once.
    let rps = cfg.stripe_rps;
    // The spread becomes durable at the first checkpoint; a crash before it spreads again.
    let moved = state.spread_overdue(clock.now_ms(), |n| {
        ((n as f64 / rps * 1000.0) as u64).min(cfg.poll_interval.as_millis() as u64)
    })?;
    if moved > 0 {
        tracing::info!(overdue = moved, "spread overdue polls after restart");
    }
    // The offset gauges start from what is durable; checkpoints update the partitions they move.
    // Only this source's: a `replay` into this data dir keeps its own position beside them.
    let position_topic = match cfg.source {
        SourceKind::Kafka => cfg.cdc_topic.clone(),
        SourceKind::Postgres => crate::source::postgres::position_topic(&cfg.slot),
    };
    for (_, partition, offset) in state
        .stored_offsets()?
        .into_iter()
        .filter(|(t, _, _)| *t == position_topic)
    {
        METRICS
            .stored_offset
            .with_label_values(&[&partition.to_string()])
            .set(offset);
    }
    let interval_ms = cfg.poll_interval.as_millis() as u64;
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

    let ready_health = health.clone();
    let ready_clock = clock;
    let kafka_source = cfg.source == SourceKind::Kafka;
    let stale_after = (cfg.checkpoint_interval * 3 + Duration::from_secs(5)).as_millis() as u64;
    let bound = admin::serve(
        cfg.metrics_addr,
        Arc::new(move || {
            if kafka_source {
                if !ready_health.kafka.is_up() {
                    return Err("no connection to any Kafka broker".into());
                }
                if !ready_health.assigned.load(Ordering::Relaxed) {
                    return Err("no CDC partition assigned yet".into());
                }
            } else if !ready_health.replication.load(Ordering::Relaxed) {
                return Err("logical replication not connected".into());
            }
            let age = ready_clock
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
    let pipeline = Pipeline {
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
    };

    // The source. Kafka: the consumer joins the group; the recovery check runs beside the
    // start (the checkpoint task waits for it). Postgres: the check comes first, since a
    // first start writes its snapshot, and the stream opens (or the snapshot loads) here.
    let mut check = Some(check);
    let (src, ownership, stream) = match cfg.source {
        SourceKind::Kafka => {
            let (consumer, ownership) = kafka_source_setup(&cfg, &state, &health, clock)?;
            (Source::Kafka(consumer), ownership, None)
        }
        SourceKind::Postgres => {
            check
                .take()
                .expect("check")
                .await
                .expect("recovery check task")?;
            health.checked.store(true, Ordering::Relaxed);
            let settings = PgSourceSettings {
                url: cfg.postgres_url().to_string(),
                slot: cfg.slot.clone(),
                publication: cfg.publication.clone(),
                table: cfg.table.clone(),
                pending_status: cfg.decode.columns.pending_status.clone(),
                resnapshot: cfg.resnapshot,
                decode: cfg.decode.options(),
            };
            let pg = Arc::new(PgSource::new(settings, state.clone(), health.clone()));
            let mut start_shutdown = shutdown.clone();
            let repl = tokio::select! {
                r = pg.start(&pipeline, &mut start_shutdown) => r?,
                _ = external.changed() => return Ok(()),
            };
            health
                .last_checkpoint_ms
                .store(clock.now_ms(), Ordering::Relaxed);
            let all = Arc::new(Ownership::all(clock));
            (Source::Postgres(pg), all, Some(repl))
        }
    };

    let poller = Arc::new(poller(
        &cfg,
        state.clone(),
        api,
        status_sink,
        clock,
        ownership,
    ));
    let poller_task = tokio::spawn(poller.clone().run(shutdown.clone()));

    // State gauges (counts, ages, polls due) are a full scan: refreshed by a periodic job, off
    // the hot path. Known gap: at a million entries the scan costs about a second of one core
    // per run (issue 6 measures it; counters kept at write time would replace it).
    let mut sched = tokio_cron_scheduler::JobScheduler::new().await.ok();
    if let Some(s) = sched.as_mut() {
        let st = state.clone();
        let job_clock = clock;
        let job =
            tokio_cron_scheduler::Job::new_repeated_async(cfg.state_stats_interval, move |_, _| {
                Box::pin(refresh_state_gauges(
                    st.clone(),
                    job_clock,
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

    // The checkpoint loop runs beside the source; both stop on shutdown or on a state error.
    let cp_state = state.clone();
    let cp_source = src.clone();
    let cp_health = health.clone();
    let mut cp_shutdown = shutdown.clone();
    let every = cfg.checkpoint_interval;
    let checkpoints = tokio::spawn(async move {
        // First the recovery check (Kafka source): it holds the checkpoint lock, and no
        // checkpoint may write to a store before it passed. A failed check stops the daemon
        // like a failed checkpoint. Polls and events go on meanwhile: nothing they do needs
        // the check, and nothing is durable or committed before it.
        if let Some(check) = check {
            check.await.expect("recovery check task")?;
            cp_health.checked.store(true, Ordering::Relaxed);
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cp_shutdown.changed() => return Ok::<(), StateError>(()),
            }
            match cp_source.checkpoint(&cp_state, &cp_health, &clock).await {
                Ok(()) => {}
                // The changelog's broker (or the lease) failed: nothing was written; the
                // changes wait in memory for the next tick. Readiness turns stale meanwhile.
                Err(e) if e.is_retryable() => {
                    METRICS.kafka_errors.with_label_values(&["changelog"]).inc();
                    tracing::warn!(error = %e, "checkpoint not written; retrying");
                }
                Err(e) => return Err(e),
            }
        }
    });

    let read = async {
        match (&src, stream) {
            (Source::Kafka(c), _) => Ok(pipeline.run(c, shutdown.clone()).await?),
            (Source::Postgres(pg), Some(repl)) => {
                Ok(pg.run(repl, &pipeline, shutdown.clone()).await?)
            }
            (Source::Postgres(_), None) => unreachable!("the stream opens with the source"),
        }
    };
    let result: Result<(), RunError> = tokio::select! {
        r = read => r,
        r = checkpoints => r.expect("checkpoint task").map_err(RunError::from),
        _ = external.changed() => Ok(()),
    };
    // Whatever ended the loop, stop every part, then make the last work durable.
    let _ = stop.send(true);
    if let Err(e) = &result {
        tracing::error!(error = %e, "stopping on an error");
    }
    let poll_result = poller_task.await.expect("poller task");
    if result.is_ok() && poll_result.is_ok() {
        match src.checkpoint(&state, &health, &clock).await {
            Ok(()) => tracing::info!("final checkpoint written"),
            // Not lost: the changes since the last checkpoint are replayed from the CDC topic.
            Err(e) if e.is_retryable() => {
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

/// One cycle of the events feed. Stripe's errors are counted and logged inside (the next
/// cycle reads again); a state error also stops the poller, and with it the daemon.
async fn feed_cycle(p: Arc<crate::poll::Poller>) {
    if let Err(e @ crate::poll::feed::FeedError::State(_)) = p.reconcile().await {
        tracing::error!(error = %e, "events feed cycle failed on the state store");
    }
}

/// Recomputes the state gauges: one full scan of state, on a blocking thread.
async fn refresh_state_gauges(state: Arc<Store>, clock: Clock, interval_ms: u64, stale_ms: u64) {
    let now = clock.now_ms();
    match tokio::task::spawn_blocking(move || state.stats(now, interval_ms, stale_ms)).await {
        Ok(Ok(s)) => crate::state::set_gauges(&s, now),
        Ok(Err(e)) => tracing::error!(error = %e, "state gauges not refreshed"),
        Err(e) => tracing::error!(error = %e, "state gauges job failed"),
    }
}

/// The Kafka source: the ownership of partitions (scale-out's lease with `--changelog`), the
/// state changelog, and the consumer, probed once so a wrong address fails at start.
fn kafka_source_setup(
    cfg: &RunConfig,
    state: &Arc<Store>,
    health: &Arc<Health>,
    clock: Clock,
) -> Result<(Arc<CdcConsumer>, Arc<Ownership>), RunError> {
    let ownership = Arc::new(if cfg.changelog {
        Ownership::leased(clock, scaleout::session_timeout(&cfg.kafka.kafka_options))
    } else {
        Ownership::unleased(clock)
    });
    let changelog = if cfg.changelog {
        let log = KafkaChangelog::new(
            &cfg.kafka.brokers,
            &cfg.kafka.kafka_options,
            &cfg.group_id,
            &cfg.cdc_topic,
            ownership.clone(),
        )?;
        tracing::info!(topic = log.topic(), "scale-out: state changelog on");
        Some(Arc::new(log))
    } else {
        None
    };
    let consumer = Arc::new(source::consumer(
        &cfg.kafka.brokers,
        &cfg.kafka.kafka_options,
        &cfg.group_id,
        &cfg.cdc_topic,
        source::ConsumerParts {
            state: state.clone(),
            health: health.clone(),
            ownership: ownership.clone(),
            changelog,
        },
    )?);
    if !crate::kafka::probe_brokers(
        consumer.as_ref(),
        &cfg.kafka.brokers,
        &cfg.cdc_topic,
        cfg.kafka.kafka_startup_timeout,
    )? {
        tracing::warn!(topic = %cfg.cdc_topic, "the CDC topic does not exist yet (Debezium creates it on its first event); waiting for it");
    }
    Ok((consumer, ownership))
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
