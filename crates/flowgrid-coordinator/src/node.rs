//! One coordinator process: connect, set up streams, join the grid (member record and
//! lease), serve the shards placement gives it, and on shutdown hand them over and leave.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use flowgrid_model::{Evaluator, Limits};
use flowgrid_proto::{GridConfig, MemberRecord, Subjects, API_QUEUE_GROUP, GRID_KEY};
use flowgrid_sdk::broker::{self, BrokerLimits};
use flowgrid_store::{Store, StoreLimits};
use flowgrid_store_redb::RedbStore;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::api::{self, Api, RequestCounters};
use crate::clock::now_ms;
use crate::cluster::{Lease, ManagerContext, Membership, ShardManager};
use crate::config::CoordinatorConfig;
use crate::dispatch::Dispatcher;
use crate::error::{Error, Result};
use crate::metrics;
use crate::plans::PlanCache;
use crate::routing::{Router, ShardTable};
use crate::shard::NodeContext;

/// Longest wait for each of the last stop steps (draining publishes, flushing NATS): a
/// stop must finish even when the NATS server is already gone.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a coordinator on the embedded store until `shutdown` is cancelled.
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> Result<()> {
    config.validate().map_err(Error::Config)?;
    crate::data_dir::check(&config.data_dir, &config.prefix, config.shards)?;
    serve_metrics(&config.metrics_addr)?;
    let cache_bytes_per_shard = config.store_cache_mb * 1024 * 1024 / config.shards as usize;
    loop {
        let store = RedbStore::open(&config.data_dir, StoreLimits::default())?
            .with_cache_bytes_per_shard(cache_bytes_per_shard)
            .with_checkpoint_interval(std::time::Duration::from_millis(config.checkpoint_interval_ms));
        let store_id = embedded_store_id(store.dir());
        let data_dir = Some(config.data_dir.clone());
        match serve(config.clone(), store, store_id, data_dir, shutdown.clone()).await {
            Err(Error::GridLost) if !shutdown.is_cancelled() => {
                warn!("joining the grid again: its streams, buckets and shard claims are made anew");
            }
            outcome => return outcome,
        }
    }
}

/// What a coordinator on the embedded store in `dir` names its store: the host and the
/// directory. Every coordinator of a grid must name the same store.
pub fn embedded_store_id(dir: &std::path::Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    format!("redb:{}:{}", flowgrid_sdk::host_name(), dir.display())
}

/// Runs a coordinator on `store` until `shutdown` is cancelled, then hands its shards to
/// the other coordinators and leaves. `store_id` names where shard state lives (every
/// coordinator of a grid must name the same).
pub async fn run_with_store<S: Store>(
    config: CoordinatorConfig,
    store: S,
    store_id: String,
    shutdown: CancellationToken,
) -> Result<()> {
    config.validate().map_err(Error::Config)?;
    serve_metrics(&config.metrics_addr)?;
    serve(config, store, store_id, None, shutdown).await
}

/// [`run_with_store`] without the metrics endpoint: joins the grid, serves until
/// `shutdown`, a broken store or the loss of the grid's state in NATS
/// ([`Error::GridLost`]), then leaves. The embedded store's `data_dir` records the grid
/// once the grid's settings let the coordinator in.
async fn serve<S: Store>(
    config: CoordinatorConfig,
    store: S,
    store_id: String,
    data_dir: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) -> Result<()> {
    let started = Instant::now();
    // Counts connections to NATS: the shard manager drops a bucket watch it was starting
    // when the connection comes back, as the request may have gone out on the dead one.
    let (connections_tx, connections) = tokio::sync::watch::channel(0u64);
    let connections_tx = Arc::new(connections_tx);
    let (options, servers) = config.nats.options(&config.nats_url).await.map_err(Error::Connect)?;
    let nats = options
        .name("flowgrid-coordinator")
        .event_callback(move |event| {
            let connections_tx = connections_tx.clone();
            async move {
                if matches!(event, async_nats::Event::Connected) {
                    connections_tx.send_modify(|count| *count += 1);
                }
            }
        })
        .connect(servers)
        .await
        .map_err(|source| {
            Error::Connect(flowgrid_sdk::Error::Connect { url: flowgrid_sdk::redact(&config.nats_url), source })
        })?;
    let jetstream = async_nats::jetstream::new(nats.clone());
    let subjects = Subjects::new(config.prefix.clone());
    // The grid's settings and its live coordinators first: a coordinator they refuse
    // (another grid's prefix naming the same streams, another store) changes no stream.
    let members_kv = broker::members_kv(&jetstream, &subjects).await?;
    let shards_kv = broker::shards_kv(&jetstream, &subjects).await?;
    let prefix_unrecorded = check_grid_config(&shards_kv, config.shards, &config.prefix).await?;
    check_same_store(&members_kv, &store_id).await?;
    let broker_limits = BrokerLimits {
        tasks_stream_bytes_max: config.tasks_stream_max_mb << 20,
        live_stream_bytes_max: config.live_output_max_mb << 20,
        ..BrokerLimits::default()
    };
    let tasks_stream = broker::tasks_stream(&jetstream, &subjects, &broker_limits).await?;
    broker::submit_stream(&jetstream, &subjects, &broker_limits).await?;
    if let Err(error) = broker::run_ends_stream(&jetstream, &subjects, &broker_limits).await {
        // A stream of the operator's own may capture these subjects already (one created by
        // hand before the grid made its own); announcements are then acknowledged by it.
        warn!(
            error = %error,
            "cannot create the run-ends stream; run-end announcements are kept only by a stream that captures {}",
            subjects.run_ended_all()
        );
    }
    if let Err(error) = broker::submit_refused_stream(&jetstream, &subjects, &broker_limits).await {
        // Refused submits then stay in the submit stream, tried again every 30 s, until it exists.
        warn!(error = %error, "cannot create the refused-submits stream; a durable submit the grid refuses stays in the submit stream until it can be kept there");
    }
    if let Err(error) = broker::live_stream(&jetstream, &subjects, &broker_limits).await {
        // Workers' live output then reaches only those who tail a run as it goes.
        warn!(error = %error, "cannot create the live-output stream; `flowgrid run tail` shows only what comes after it starts");
    }
    let workers_kv = match broker::workers_kv(&jetstream, &subjects).await {
        Ok(bucket) => Some(bucket),
        Err(error) => {
            warn!(error = %error, "cannot create the workers bucket; `flowgrid workers` lists none until a worker makes it");
            None
        }
    };
    if let Some((revision, settings)) = prefix_unrecorded {
        // The tasks stream takes this prefix's subjects: the grid is this prefix's.
        record_prefix(&shards_kv, revision, settings, &config.prefix).await;
    }
    if let Some(dir) = &data_dir {
        crate::data_dir::record(dir, &config.prefix, config.shards);
    }

    let limits = Limits::default();
    let (max_payload, needed) =
        (nats.server_info().max_payload, flowgrid_proto::max_payload_needed(limits.payload_bytes_max));
    if max_payload < needed {
        warn!(
            max_payload,
            "nats-server's max_payload is too small for a task input or output at the grid's limit of {} bytes: \
             such a task cannot be published (its attempt times out) and such a result is refused; set max_payload \
             to at least {needed} (deploy/nats-server.conf sets 8MB)",
            limits.payload_bytes_max
        );
    }
    let evaluator = Arc::new(Evaluator::new(&limits));
    let plans = Arc::new(PlanCache::new(evaluator, limits.clone()));
    let workers_shutdown = CancellationToken::new();
    // Stops task publishing on an early return too.
    let _workers_stop_on_return = workers_shutdown.clone().drop_guard();
    let pools_stop = CancellationToken::new();
    // Stops the gauges on an early return too.
    let _pools_stop_on_return = pools_stop.clone().drop_guard();
    let pools_task = (config.metrics_addr != "off" && config.pool_gauges_ms > 0).then(|| {
        let every = Duration::from_millis(config.pool_gauges_ms);
        tokio::spawn(crate::pools::run(tasks_stream.clone(), workers_kv, every, pools_stop.clone()))
    });
    let (dispatcher, dispatcher_task) = Dispatcher::spawn(
        nats.clone(),
        tasks_stream,
        subjects.clone(),
        broker_limits.clone(),
        workers_shutdown.clone(),
    )
    .await?;
    let lease = Arc::new(Lease::new(Duration::from_millis(config.lease_ms)));
    let context = Arc::new(NodeContext {
        subjects: subjects.clone(),
        nats: nats.clone(),
        plans,
        dispatcher,
        task_cache: Arc::new(crate::cache::TaskCache::new(
            jetstream.clone(),
            subjects.clone(),
            config.task_cache_max_mb << 20,
        )),
        store_limits: StoreLimits::default(),
        batch_events_max: config.batch_events_max,
        active_runs_max: config.active_runs_max,
        active_runs: AtomicU64::new(0),
        lease: lease.clone(),
        retain_ended_ms: Some(config.retain_ended_runs.as_millis() as u64).filter(|&ms| ms > 0),
        client: flowgrid_sdk::Client::new(nats.clone(), subjects.prefix()),
        messages_in_flight: Arc::new(tokio::sync::Semaphore::new(crate::shard::MESSAGES_IN_FLIGHT_MAX)),
        children_starting: Arc::default(),
    });
    let table = Arc::new(ShardTable::new(config.shards));
    let router = Arc::new(Router::new(context.clone(), table.clone(), config.shards));

    // Whatever can fail before this coordinator serves is set up before it joins: once its
    // record is written it may be given shards, and only the stop below hands them back.
    let api = Arc::new(Api {
        router: router.clone(),
        limits,
        requests: RequestCounters::register(),
        fan_outs: Semaphore::new(api::FAN_OUTS_MAX),
    });
    let requests = nats
        .queue_subscribe(subjects.api_all(), API_QUEUE_GROUP.to_owned())
        .await
        .map_err(|source| Error::Nats { what: "subscribe to the API", source: Box::new(source) })?;
    let refused = crate::submit::Refusals::new(nats.clone(), subjects.clone(), broker_limits.clone());
    let source = crate::submit::SubmitSource {
        jetstream: jetstream.clone(),
        subjects: subjects.clone(),
        limits: broker_limits.clone(),
    };
    let opened = source.open().await.map_err(|error| Error::Nats {
        what: "open the submit stream's consumer",
        source: format!(
            "{error}; the grid reads that stream through a pull consumer of its own: if one named {consumer} was made \
             by hand, delete it (`nats consumer rm {stream} {consumer}`); check that NATS and its JetStream are up, \
             then start the coordinator again",
            stream = subjects.submit_stream(),
            consumer = subjects.submit_consumer(),
        )
        .into(),
    })?;

    // Join: the first heartbeat makes this member visible and starts its lease.
    let me = member_id();
    let record = MemberRecord {
        id: me.clone(),
        host: flowgrid_sdk::host_name(),
        pid: std::process::id(),
        started_ms: now_ms(),
        heartbeat_ms: now_ms(),
        lease_ms: config.lease_ms,
        draining: false,
        catching_up: true,
        shards_serving: 0,
        store: store_id.clone(),
        metrics_addr: (config.metrics_addr != "off").then(|| config.metrics_addr.clone()),
    };
    let membership =
        Arc::new(Membership::join(members_kv.clone(), jetstream.clone(), record, lease.clone(), table.clone()).await?);
    let grid_lost = membership.lost();
    membership.beat().await?;
    // Two coordinators with different stores that started at the same instant both passed
    // the check above. Read again now that this one's record is there: of two such records,
    // the one written second sees the other (both may), and leaves before it takes a shard.
    if let Err(error) = check_same_store(&members_kv, &store_id).await {
        membership.leave().await;
        return Err(error);
    }
    let heartbeat_stop = CancellationToken::new();
    let heartbeat_task = tokio::spawn(membership.clone().run(heartbeat_stop.clone()));
    let shards_stop = CancellationToken::new();
    let manager = ShardManager::new(
        ManagerContext {
            me: me.clone(),
            store,
            router,
            shards_kv,
            lease,
            membership: membership.clone(),
            queue_max: config.shard_queue_max,
            forward_permits: Arc::new(Semaphore::new(config.api_concurrency_max)),
            open_failures: Default::default(),
            connections,
            shards_stop: shards_stop.clone(),
        },
        config.shards,
    );
    let drain = CancellationToken::new();
    let mut manager_task = tokio::spawn(manager.run(members_kv, drain.clone()));

    let api_stop = CancellationToken::new();
    let api_task = tokio::spawn(api::serve(api.clone(), requests, config.api_concurrency_max, api_stop.clone()));
    let submit_task = tokio::spawn(crate::submit::serve(api.clone(), source, opened, refused, api_stop.clone()));
    info!(
        member = %me,
        nats = %flowgrid_sdk::redact(&config.nats_url),
        prefix = %config.prefix,
        data_dir = %config.data_dir.display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "coordinator joined the grid"
    );

    let mut broken = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = grid_lost.cancelled() => broken = Some(Error::GridLost),
        stopped = &mut manager_task => match stopped {
            // It has handed its shards over already.
            Ok(Some(failure)) => broken = Some(Error::StoreBroken(failure)),
            stopped => {
                let why = match stopped {
                    Err(error) => error.to_string(),
                    Ok(_) => "it returned before a drain".to_owned(),
                };
                error!(why = %why, "the shard manager stopped unexpectedly; stopping its shards and leaving the grid");
                // Its shards' actors are not handed over: they stop now, so that their
                // files are free for the members that take the shards.
                shards_stop.cancel();
                broken = Some(Error::ManagerStopped(why));
            }
        },
    }
    // Without NATS nothing can be handed over or answered: the others take the shards when
    // the lease runs out, so waiting for each step of a drain would only delay the exit.
    let nats_up = nats.connection_state() == async_nats::connection::State::Connected;
    if nats_up {
        info!("coordinator stopping: handing its shards over");
    } else {
        warn!("coordinator stopping without NATS: its shards go to the others when its lease runs out");
    }
    // New requests go to the other coordinators; what is in progress finishes.
    api_stop.cancel();
    let _ = api_task.await;
    let _ = submit_task.await;
    drain.cancel();
    let drain_timeout = if nats_up { Duration::from_millis(config.drain_timeout_ms) } else { Duration::ZERO };
    if !manager_task.is_finished() && tokio::time::timeout(drain_timeout, &mut manager_task).await.is_err() {
        if nats_up {
            warn!(
                timeout_ms = config.drain_timeout_ms,
                "shards not all handed over in time; they stop here, and the others take them as soon as this \
                 coordinator has left"
            );
        }
        manager_task.abort();
        // The shards it had not handed over stop here and now (each answers what it holds
        // with `unavailable`), instead of at their next event after the lease is gone; in
        // a process that joins the grid again they would keep their files locked.
        shards_stop.cancel();
    }
    heartbeat_stop.cancel();
    let _ = heartbeat_task.await;
    pools_stop.cancel();
    if let Some(pools_task) = pools_task {
        let _ = pools_task.await;
    }
    if nats_up {
        membership.leave().await;
    }
    drop(api);
    workers_shutdown.cancel();
    // Publishes still awaiting acks are bounded by JetStream's ack timeout; what is cut
    // off here is republished by the shards' next owners.
    let stop_wait = if nats_up { STOP_WAIT } else { Duration::ZERO };
    if tokio::time::timeout(stop_wait, dispatcher_task).await.is_err() && nats_up {
        warn!("task publishing did not drain in time; open tasks are republished by the next owners");
    }
    // Without a server (it stopped first), a flush would wait for a reconnect forever.
    if let Err(error) = tokio::time::timeout(stop_wait, nats.flush()).await.unwrap_or(Ok(())) {
        tracing::debug!(error = %error, "flush on stop failed");
    }
    info!("coordinator stopped");
    match broken {
        Some(failure) => Err(failure),
        None => Ok(()),
    }
}

/// The grid's settings as coordinators record them under [`GRID_KEY`]: the [`GridConfig`]
/// and the prefix the grid was made with. Stream and bucket names fold the prefix
/// (upper-cased, `.` and `-` as `_`), so that two prefixes can name the same ones: the
/// prefix recorded tells their grids apart. Whoever wants the settings only (`flowgrid
/// status`) reads the record as a [`GridConfig`].
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct GridRecord {
    #[serde(flatten)]
    settings: GridConfig,
    /// Absent in settings recorded by earlier versions, until a coordinator of this one
    /// joins the grid ([`record_prefix`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
}

impl GridRecord {
    fn encode(&self) -> bytes::Bytes {
        rmp_serde::to_vec_named(self).expect("grid settings encode").into()
    }
}

/// Records the grid's shard count and prefix on first start; refuses a coordinator that
/// disagrees: another shard count (runs are placed by hashing over the shard count, which
/// can never change), or another prefix naming the same streams and buckets (another
/// grid's). Settings an earlier version recorded without the prefix are returned with
/// their revision, for [`record_prefix`] once the grid's streams show they are this
/// prefix's.
async fn check_grid_config(shards_kv: &kv::Store, shards: u32, prefix: &str) -> Result<Option<(u64, GridConfig)>> {
    let record = GridRecord { settings: GridConfig { shards, created_ms: now_ms() }, prefix: Some(prefix.to_owned()) };
    let not_created = match shards_kv.create(GRID_KEY, record.encode()).await {
        Ok(_) => return Ok(None),
        Err(error) => error,
    };
    let entry = shards_kv
        .entry(GRID_KEY)
        .await
        .map_err(|source| Error::Nats { what: "read the grid settings", source: Box::new(source) })?;
    let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
        // Neither written nor there: joining now would leave the grid's settings unchecked.
        return Err(Error::Nats {
            what: "record the grid settings",
            source: format!(
                "{not_created}, and no settings were found in the {} bucket either: check that NATS and its \
                 JetStream are up and that this user may write to the bucket, then start the coordinator again",
                shards_kv.name
            )
            .into(),
        });
    };
    let existing: GridRecord = rmp_serde::from_slice(&entry.value)
        .map_err(|error| Error::Corrupt { what: "grid settings".to_owned(), message: error.to_string() })?;
    if let Some(theirs) = existing.prefix.as_deref().filter(|&theirs| theirs != prefix) {
        return Err(Error::Config(other_prefix_refused(prefix, theirs, &shards_kv.name)));
    }
    if existing.settings.shards != shards {
        return Err(Error::Config(format!(
            "this grid has {} shards (fixed when it was created), this coordinator was started with --shards {shards}: \
             start it with --shards {}",
            existing.settings.shards, existing.settings.shards
        )));
    }
    Ok(existing.prefix.is_none().then_some((entry.revision, existing.settings)))
}

/// Why a coordinator started with `--prefix ours` is refused by the grid of prefix `theirs`,
/// whose bucket `bucket` it would share.
fn other_prefix_refused(ours: &str, theirs: &str, bucket: &str) -> String {
    format!(
        "--prefix {ours:?} names the same NATS streams and buckets as the grid of prefix {theirs:?} (names are the \
         prefix upper-cased, with '.' and '-' as '_': both use the bucket {bucket}): start this coordinator with \
         --prefix {theirs} to join that grid, or give its own grid a prefix that differs from {theirs:?} in more \
         than case, '.', '-' and '_'"
    )
}

/// Writes the grid's prefix into settings an earlier version recorded without it (at
/// `revision`), so that another prefix naming the same buckets is refused from now on.
/// Another coordinator that wrote it first did as well.
async fn record_prefix(shards_kv: &kv::Store, revision: u64, settings: GridConfig, prefix: &str) {
    let record = GridRecord { settings, prefix: Some(prefix.to_owned()) };
    if let Err(error) = shards_kv.update(GRID_KEY, record.encode(), revision).await {
        debug!(error = %error, "the grid's prefix not added to its settings; the next coordinator to start adds it");
    }
}

/// Refuses to join when a live coordinator keeps its shards elsewhere: with the embedded
/// store every coordinator of a grid must share one data directory on one host; on
/// FoundationDB, one cluster and root. A coordinator that cannot read the members does
/// not join unchecked: it fails, and is started again.
async fn check_same_store(members_kv: &kv::Store, store_id: &str) -> Result<()> {
    let unchecked = |error: String| Error::Nats {
        what: "read the grid's coordinators",
        source: format!(
            "{error}; a coordinator joins a grid only once it has checked that its live coordinators keep the \
             shards in the same store: check that NATS and its JetStream are up and that this user may read the \
             {} bucket, then start the coordinator again",
            members_kv.name
        )
        .into(),
    };
    let keys = members_kv.keys().await.map_err(|error| unchecked(format!("cannot list the members: {error}")))?;
    let keys: Vec<String> =
        keys.try_collect().await.map_err(|error| unchecked(format!("cannot list the members: {error}")))?;
    for key in keys {
        let entry = members_kv
            .entry(key.as_str())
            .await
            .map_err(|error| unchecked(format!("cannot read member {key}: {error}")))?;
        // Left since the listing.
        let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else { continue };
        let member = match rmp_serde::from_slice::<MemberRecord>(&entry.value) {
            Ok(member) => member,
            Err(error) => {
                warn!(member = %key, error = %error, "unreadable member record; its store is not compared with this one's");
                continue;
            }
        };
        let fresh = now_ms().saturating_sub(member.heartbeat_ms) <= member.lease_ms.saturating_mul(2);
        if fresh && member.store != store_id {
            return Err(Error::Config(format!(
                "coordinator {} (pid {} on {}) keeps this grid's shards in {}, this one would use {store_id}: \
                 coordinators of one grid must share the store (the same --data-dir on one host, or cluster files \
                 naming the same FoundationDB cluster and the same --fdb-root), or use another --prefix for a \
                 separate grid",
                member.id, member.pid, member.host, member.store
            )));
        }
    }
    Ok(())
}

/// A member id unique to this process start: `<host>-<pid>-<4 hex digits>`.
fn member_id() -> String {
    let salt = uuid::Uuid::new_v4().as_u128() as u16;
    format!("{}-{}-{salt:04x}", flowgrid_sdk::host_name(), std::process::id())
}

fn serve_metrics(addr: &str) -> Result<()> {
    if addr == "off" {
        return Ok(());
    }
    let socket: std::net::SocketAddr =
        addr.parse().map_err(|_| Error::Config(format!("--metrics-addr {addr:?} is not host:port")))?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(socket)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(metrics::RUN_DURATION.to_owned()),
            &metrics::RUN_DURATION_BUCKETS,
        )
        .map_err(|error| Error::Metrics { addr: addr.to_owned(), message: error.to_string() })?
        .install()
        .map_err(|error| Error::Metrics { addr: addr.to_owned(), message: error.to_string() })?;
    metrics::describe();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_settings_keep_their_prefix_and_read_as_before() {
        let settings = GridConfig { shards: 16, created_ms: 1_700_000_000_000 };
        let record = GridRecord { settings: settings.clone(), prefix: Some("team-a".to_owned()) };
        let read: GridConfig = rmp_serde::from_slice(&record.encode()).unwrap();
        assert_eq!(read, settings, "read as settings only (`flowgrid status`)");
        assert_eq!(rmp_serde::from_slice::<GridRecord>(&record.encode()).unwrap(), record);
        // Recorded by an earlier version: no prefix yet.
        let earlier = rmp_serde::to_vec_named(&settings).unwrap();
        let read: GridRecord = rmp_serde::from_slice(&earlier).unwrap();
        assert_eq!(read, GridRecord { settings, prefix: None });
    }
}
