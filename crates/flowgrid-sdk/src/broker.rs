//! JetStream streams and consumers, created on demand with bounded sizes.
//!
//! The tasks stream holds every pool's tasks under `<prefix>.tasks.<pool>` (and the
//! pool's priority lanes, `<prefix>.tasks.<pool>.p<n>`) with work-queue retention: a
//! message leaves the stream when a worker acks it. Each lane of a pool has one durable
//! pull consumer that all of the pool's workers share. Limits are explicit so that a
//! stalled pool fills up and is refused (`discard new`) instead of growing without bound.

use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, consumer, kv, stream};
use flowgrid_proto::{Subjects, PRIORITY_DEFAULT, PRIORITY_MAX};

/// Settings of the streams and consumers; defaults fit a laptop.
#[derive(Clone, Debug)]
pub struct BrokerLimits {
    /// Tasks waiting in the stream over all pools; past it, publishes are refused.
    pub tasks_stream_messages_max: i64,
    /// Bytes of waiting tasks over all pools.
    pub tasks_stream_bytes_max: i64,
    /// Window in which JetStream drops a republished task with the same message id.
    pub duplicate_window: Duration,
    /// How long a worker may hold a task without acking or heartbeating before
    /// JetStream hands it to another worker.
    pub ack_wait: Duration,
    /// Deliveries of one task message; after that the coordinator's attempt timeout
    /// takes over (a poison task must not loop forever).
    pub deliveries_max: i64,
    /// Tasks of one pool delivered and not yet acked, over all its workers.
    pub pool_ack_pending_max: i64,
    /// Runs waiting in the durable submit stream.
    pub submit_stream_messages_max: i64,
    /// Bytes of run-ended announcements kept; past it, the oldest go. Bounds the stream's
    /// disk use whatever the run rate (about a million small announcements).
    pub run_ends_stream_bytes_max: i64,
    /// How long a run-ended announcement is kept: long enough for a service to be down over
    /// a weekend and still read every end it missed.
    pub run_ends_kept: Duration,
    /// Bytes of refused submits kept; past it, the oldest go.
    pub submits_refused_bytes_max: i64,
    /// How long a refused submit is kept.
    pub submits_refused_kept: Duration,
    /// Bytes of live output kept; past it, the oldest goes.
    pub live_stream_bytes_max: i64,
    /// How long live output is kept: enough to tail a run that started a while ago.
    pub live_kept: Duration,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            tasks_stream_messages_max: 1_000_000,
            tasks_stream_bytes_max: 1024 * 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            deliveries_max: 10,
            pool_ack_pending_max: 20_000,
            submit_stream_messages_max: 1_000_000,
            run_ends_stream_bytes_max: 256 * 1024 * 1024,
            run_ends_kept: Duration::from_secs(7 * 24 * 60 * 60),
            submits_refused_bytes_max: 64 * 1024 * 1024,
            submits_refused_kept: Duration::from_secs(7 * 24 * 60 * 60),
            live_stream_bytes_max: 64 * 1024 * 1024,
            live_kept: Duration::from_secs(60 * 60),
        }
    }
}

/// Errors of stream and consumer setup. Usually NATS is unreachable or JetStream is not
/// enabled (`nats-server -js`).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot create or open stream {name} (is JetStream enabled on the server, `nats-server -js`?): {source}")]
    Stream {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error(
        "cannot create stream {name}: nats-server has less JetStream storage left than the stream's limit of {} MiB \
         (its `jetstream {{ max_file_store }}`, by default 75% of the disk space free when it started): give it more, \
         or have the stream created smaller by starting a coordinator with --tasks-stream-max-mb first: {source}",
        bytes_max >> 20
    )]
    StreamStorage {
        name: String,
        bytes_max: i64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error(
        "stream {name} takes subjects {found:?} and tasks of a priority other than the default need {wanted:?}: start \
         a coordinator of this version (it updates the stream), or update the stream's subjects with the NATS CLI: \
         {source}"
    )]
    StreamSubjects {
        name: String,
        found: Vec<String>,
        wanted: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error(
        "stream {name} takes subjects {found:?}, not this grid's {wanted:?}: it is another grid's, whose prefix \
         differs from this one only in case or in '.', '-' and '_' (stream names are the prefix upper-cased, with '.' \
         and '-' as '_'), or its subjects were changed by hand. Use the other grid's prefix to join it, or a prefix \
         that differs more for a grid of its own; a stream changed by hand must take {wanted:?} again"
    )]
    StreamOfAnotherGrid { name: String, found: Vec<String>, wanted: String },
    #[error("cannot create or open key-value bucket {name} (is JetStream enabled on the server, `nats-server -js`?): {source}")]
    Bucket {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error("cannot create or open consumer {name} on stream {stream}: {source}")]
    Consumer {
        stream: String,
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// Creates the tasks stream if it does not exist and returns it. A stream made before
/// priority lanes (subjects `<prefix>.tasks.*`) is given the lanes' subjects. A stream of
/// the same name taking other subjects (another grid's, whose prefix names the same
/// streams) is refused and left as it is.
pub async fn tasks_stream(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    limits: &BrokerLimits,
) -> Result<stream::Stream, BrokerError> {
    let wanted = subjects.tasks_all();
    let config = stream::Config {
        subjects: vec![wanted.clone()],
        max_messages: limits.tasks_stream_messages_max,
        max_bytes: limits.tasks_stream_bytes_max,
        // A task message goes when its attempt's deadline has passed (`Nats-TTL`, set by
        // coordinators): no worker could use it any more.
        allow_message_ttl: true,
        ..work_queue_stream(subjects.tasks_stream(), limits)
    };
    let mut stream = open_stream(jetstream, config).await?;
    let found = stream.cached_info().config.subjects.clone();
    let before_lanes = found == [subjects.tasks_all_before_lanes()];
    if found != [wanted.clone()] && !before_lanes {
        return Err(BrokerError::StreamOfAnotherGrid { name: subjects.tasks_stream(), found, wanted });
    }
    if !stream.cached_info().config.allow_message_ttl {
        // Made before tasks had a lifetime: allow it (a server before 2.11 keeps none, and
        // its tasks stay until a worker takes them, as before).
        let mut config = stream.cached_info().config.clone();
        config.allow_message_ttl = true;
        if let Ok(info) = jetstream.update_stream(config).await {
            if info.config.allow_message_ttl {
                stream = jetstream.get_stream(&info.config.name).await.map_err(|source| BrokerError::Stream {
                    name: info.config.name.clone(),
                    source: Box::new(source),
                })?;
            }
        }
    }
    if before_lanes {
        let mut config = stream.cached_info().config.clone();
        config.subjects = vec![wanted.clone()];
        let name = config.name.clone();
        jetstream.update_stream(config).await.map_err(|source| BrokerError::StreamSubjects {
            name: name.clone(),
            found,
            wanted,
            source: Box::new(source),
        })?;
        stream = jetstream
            .get_stream(&name)
            .await
            .map_err(|source| BrokerError::Stream { name, source: Box::new(source) })?;
    }
    Ok(stream)
}

/// Creates the durable submit stream if it does not exist and returns it.
pub async fn submit_stream(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    limits: &BrokerLimits,
) -> Result<stream::Stream, BrokerError> {
    let config = stream::Config {
        subjects: vec![subjects.submit()],
        max_messages: limits.submit_stream_messages_max,
        ..work_queue_stream(subjects.submit_stream(), limits)
    };
    open_stream(jetstream, config).await
}

/// Creates the stream that keeps the durable submits coordinators refused, if it does not
/// exist, and returns it: a submit JetStream stored is never dropped without a trace.
pub async fn submit_refused_stream(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    limits: &BrokerLimits,
) -> Result<stream::Stream, BrokerError> {
    // A coordinator that keeps a refusal and dies before it acks the submit keeps it again:
    // the same message id, dropped inside the duplicate window.
    let config = kept_stream(
        subjects.submit_refused_stream(),
        subjects.submit_refused(),
        (limits.submits_refused_bytes_max, limits.submits_refused_kept),
        limits,
    );
    open_stream(jetstream, config).await
}

/// Creates the stream that keeps run-ended announcements if it does not exist and
/// returns it: services read it with a durable consumer of their own, so that they miss
/// no run's end while they are down (within `run_ends_kept` and its size bound).
pub async fn run_ends_stream(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    limits: &BrokerLimits,
) -> Result<stream::Stream, BrokerError> {
    let config = kept_stream(
        subjects.run_ends_stream(),
        subjects.run_ended_all(),
        (limits.run_ends_stream_bytes_max, limits.run_ends_kept),
        limits,
    );
    open_stream(jetstream, config).await
}

/// A stream that keeps what is published on `subject` for a while: at most `kept`'s bytes,
/// each message at most `kept`'s age, the oldest dropped first.
fn kept_stream(name: String, subject: String, kept: (i64, Duration), limits: &BrokerLimits) -> stream::Config {
    let (max_bytes, max_age) = kept;
    stream::Config {
        name,
        subjects: vec![subject],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_bytes,
        max_age,
        duplicate_window: limits.duplicate_window,
        ..Default::default()
    }
}

/// Creates the stream that keeps the workers' live output ([`flowgrid_proto::LiveOutput`])
/// if it does not exist and returns it: whoever tails a run reads it from the start.
pub async fn live_stream(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    limits: &BrokerLimits,
) -> Result<stream::Stream, BrokerError> {
    let config = stream::Config {
        name: subjects.live_stream(),
        subjects: vec![subjects.live_all()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_bytes: limits.live_stream_bytes_max,
        max_age: limits.live_kept,
        // A piece and its headers; a bigger message is refused, not stored.
        max_message_size: (flowgrid_proto::LiveOutput::BYTES_MAX + 1024) as i32,
        ..Default::default()
    };
    open_stream(jetstream, config).await
}

/// The pull consumer of `pool`'s default lane, created on first use with the shared settings.
pub async fn pool_consumer(
    tasks: &stream::Stream,
    subjects: &Subjects,
    pool: &str,
    limits: &BrokerLimits,
) -> Result<consumer::PullConsumer, BrokerError> {
    let config = lane_consumer_config(subjects, pool, PRIORITY_DEFAULT, limits.pool_ack_pending_max, limits);
    open_consumer(tasks, &subjects.tasks_stream(), config).await
}

/// The pull consumer of `pool`'s lane of `priority`, created on first use with the shared
/// settings and the bound on tasks out at once that the pool's consumer has (set by
/// `flowgrid pool limit`).
pub async fn lane_consumer(
    tasks: &stream::Stream,
    subjects: &Subjects,
    pool: &str,
    priority: u8,
    limits: &BrokerLimits,
) -> Result<consumer::PullConsumer, BrokerError> {
    if priority == PRIORITY_DEFAULT {
        return pool_consumer(tasks, subjects, pool, limits).await;
    }
    let name = subjects.lane_consumer(pool, priority);
    if let Ok(consumer) = tasks.get_consumer::<consumer::pull::Config>(&name).await {
        return Ok(consumer);
    }
    // Missing (or unreadable: then creating it says why). It takes the pool consumer's
    // bound and ack wait, which its workers' heartbeats follow, whoever creates it.
    let pool_config = pool_consumer(tasks, subjects, pool, limits).await?.cached_info().config.clone();
    let config = consumer::pull::Config {
        ack_wait: pool_config.ack_wait,
        ..lane_consumer_config(subjects, pool, priority, pool_config.max_ack_pending, limits)
    };
    open_consumer(tasks, &subjects.tasks_stream(), config).await
}

fn lane_consumer_config(
    subjects: &Subjects,
    pool: &str,
    priority: u8,
    max_ack_pending: i64,
    limits: &BrokerLimits,
) -> consumer::pull::Config {
    consumer::pull::Config {
        filter_subject: subjects.task_lane(pool, priority),
        max_deliver: limits.deliveries_max,
        max_ack_pending,
        ..durable_pull_consumer(subjects.lane_consumer(pool, priority), limits)
    }
}

/// Sets how many tasks of `pool` may be out with its workers at once (the `max_ack_pending`
/// of each of its lanes' consumers; tasks past it wait in the stream), creating the default
/// lane's consumer if it is missing. Returns the bound the pool's consumer had and the
/// priorities of the lanes it was set on, highest first.
pub async fn set_pool_max_in_flight(
    tasks: &stream::Stream,
    subjects: &Subjects,
    pool: &str,
    max_in_flight: i64,
    limits: &BrokerLimits,
) -> Result<(i64, Vec<u8>), BrokerError> {
    let mut previous = None;
    let mut lanes = Vec::new();
    for priority in (0..=PRIORITY_MAX).rev() {
        let name = subjects.lane_consumer(pool, priority);
        let consumer_error = |source: Box<dyn std::error::Error + Send + Sync>| BrokerError::Consumer {
            stream: subjects.tasks_stream(),
            name: name.clone(),
            source,
        };
        if priority == PRIORITY_DEFAULT {
            pool_consumer(tasks, subjects, pool, limits).await?;
        }
        let mut config = match tasks.consumer_info(&name).await {
            Ok(info) => info.config,
            Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound && priority != PRIORITY_DEFAULT => continue,
            Err(error) => return Err(consumer_error(Box::new(error))),
        };
        if priority == PRIORITY_DEFAULT {
            previous = Some(config.max_ack_pending);
        }
        lanes.push(priority);
        if config.max_ack_pending != max_in_flight {
            config.max_ack_pending = max_in_flight;
            tasks.update_consumer(config).await.map_err(|source| consumer_error(Box::new(source)))?;
        }
    }
    Ok((previous.expect("the default lane is among the priorities"), lanes))
}

/// The durable consumer coordinators share to drain the submit stream.
pub async fn submit_consumer(
    submit: &stream::Stream,
    subjects: &Subjects,
    limits: &BrokerLimits,
) -> Result<consumer::PullConsumer, BrokerError> {
    // No bound on the submits out at once (the server's default is 1,000): a submit whose
    // start keeps being refused for now (its shard unavailable) stays out between its
    // deliveries, and a thousand of them would stop every other submit.
    let config =
        consumer::pull::Config { max_ack_pending: -1, ..durable_pull_consumer(subjects.submit_consumer(), limits) };
    let consumer = open_consumer(submit, &subjects.submit_stream(), config.clone()).await?;
    if consumer.cached_info().config.max_ack_pending == config.max_ack_pending {
        return Ok(consumer);
    }
    // Made by an earlier version, with the default.
    submit.update_consumer(config).await.map_err(|source| BrokerError::Consumer {
        stream: subjects.submit_stream(),
        name: subjects.submit_consumer(),
        source: Box::new(source),
    })
}

/// How long the members bucket keeps a record nobody rewrites: a dead coordinator stays
/// visible (as dead) this long in `flowgrid members`, then disappears.
pub const MEMBERS_KEPT: Duration = Duration::from_secs(60);

/// The members bucket (one record per coordinator, see [`flowgrid_proto::MemberRecord`]),
/// created if missing.
pub async fn members_kv(jetstream: &jetstream::Context, subjects: &Subjects) -> Result<kv::Store, BrokerError> {
    let config = kv::Config {
        bucket: subjects.members_bucket(),
        description: "flowgrid coordinators: one record per live process, rewritten every heartbeat".to_owned(),
        history: 1,
        max_age: MEMBERS_KEPT,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    open_kv(jetstream, config).await
}

/// The workers bucket (one record per live worker and pool, see
/// [`flowgrid_proto::WorkerRecord`]), created if missing.
pub async fn workers_kv(jetstream: &jetstream::Context, subjects: &Subjects) -> Result<kv::Store, BrokerError> {
    let config = kv::Config {
        bucket: subjects.workers_bucket(),
        description: "flowgrid workers: one record per live worker and pool, rewritten every few seconds".to_owned(),
        history: 1,
        max_age: Duration::from_millis(flowgrid_proto::WorkerRecord::KEPT_MS),
        storage: stream::StorageType::File,
        ..Default::default()
    };
    open_kv(jetstream, config).await
}

/// Revisions the shards bucket keeps of each claim. A watch reads the stream behind the
/// bucket; with one revision kept, a claim changed twice in quick succession (`released`,
/// then `acquiring` by another member) can lose its first change before a watch delivers
/// it, and the watcher sees the claim move straight from one owner to another. Kept
/// revisions also let an operator read a shard's last hand-overs (`flowgrid shards --history`).
pub const CLAIM_REVISIONS_KEPT: i64 = 8;

/// The shards bucket (one claim per shard and the grid's settings, see
/// [`flowgrid_proto::ShardClaim`]), created if missing.
pub async fn shards_kv(jetstream: &jetstream::Context, subjects: &Subjects) -> Result<kv::Store, BrokerError> {
    let config = kv::Config {
        bucket: subjects.shards_bucket(),
        description: "flowgrid shard claims (compare-and-set) and grid settings".to_owned(),
        history: CLAIM_REVISIONS_KEPT,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    open_kv(jetstream, config).await
}

/// The task cache bucket (see [`Subjects::task_cache_bucket`]), created if missing, holding
/// at most `max_bytes`: when full, the oldest entries go first. An entry is kept at most
/// `max_age` (a step's `cache.ttl_ms` decides when it stops being used).
pub async fn task_cache_kv(
    jetstream: &jetstream::Context,
    subjects: &Subjects,
    max_bytes: i64,
    max_age: Duration,
) -> Result<kv::Store, BrokerError> {
    let config = kv::Config {
        bucket: subjects.task_cache_bucket(),
        description: "flowgrid task cache: worker results of steps with `cache`, by pool, task and key".to_owned(),
        history: 1,
        max_age,
        max_bytes,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let name = config.bucket.clone();
    let store = open_kv(jetstream, config).await?;
    // A key-value bucket refuses new entries when full; a cache drops its oldest instead.
    let updated = async {
        let mut config = store.status().await?.info.config;
        if config.discard != stream::DiscardPolicy::Old || config.max_bytes != max_bytes || config.max_age != max_age {
            config.discard = stream::DiscardPolicy::Old;
            config.max_bytes = max_bytes;
            config.max_age = max_age;
            jetstream.update_stream(config).await?;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    updated.await.map_err(|source| BrokerError::Bucket { name, source })?;
    Ok(store)
}

async fn open_kv(jetstream: &jetstream::Context, config: kv::Config) -> Result<kv::Store, BrokerError> {
    let name = config.bucket.clone();
    if let Ok(store) = jetstream.get_key_value(&name).await {
        // Kept revisions help watchers and operators; nothing depends on them.
        if let Err(error) = raise_history(jetstream, &store, config.history).await {
            tracing::warn!(
                bucket = %name,
                history = config.history,
                error = %error,
                "cannot raise the revisions the bucket keeps per key; the grid works as before, but watchers may miss \
                 a quick change and `flowgrid shards --history` shows less (raise it by hand: `nats stream edit \
                 KV_<bucket> --max-msgs-per-subject <history>`, which needs the permission to update streams)"
            );
        }
        return Ok(store);
    }
    match jetstream.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another process may have created it in between.
        Err(source) => {
            jetstream.get_key_value(&name).await.map_err(|_| BrokerError::Bucket { name, source: Box::new(source) })
        }
    }
}

/// Raises the revisions a bucket made by an earlier version keeps per key to `history`;
/// never lowers them (an operator may keep more).
async fn raise_history(
    jetstream: &jetstream::Context,
    store: &kv::Store,
    history: i64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let status = store.status().await?;
    if status.history() >= history {
        return Ok(());
    }
    let mut config = status.info.config;
    config.max_messages_per_subject = history;
    jetstream.update_stream(config).await?;
    Ok(())
}

/// A file-backed work-queue stream that refuses new messages when full.
fn work_queue_stream(name: String, limits: &BrokerLimits) -> stream::Config {
    stream::Config {
        name,
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        duplicate_window: limits.duplicate_window,
        ..Default::default()
    }
}

/// A durable pull consumer with explicit acks.
fn durable_pull_consumer(name: String, limits: &BrokerLimits) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: limits.ack_wait,
        ..Default::default()
    }
}

async fn open_stream(jetstream: &jetstream::Context, config: stream::Config) -> Result<stream::Stream, BrokerError> {
    let (name, bytes_max) = (config.name.clone(), config.max_bytes);
    jetstream.get_or_create_stream(config).await.map_err(|source| match source.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(error)
            if error.error_code() == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED =>
        {
            BrokerError::StreamStorage { name, bytes_max, source: Box::new(source) }
        }
        _ => BrokerError::Stream { name, source: Box::new(source) },
    })
}

async fn open_consumer(
    stream: &stream::Stream,
    stream_name: &str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, BrokerError> {
    let name = config.durable_name.clone().unwrap_or_default();
    stream.get_or_create_consumer(&name, config).await.map_err(|source| BrokerError::Consumer {
        stream: stream_name.to_owned(),
        name,
        source: Box::new(source),
    })
}
