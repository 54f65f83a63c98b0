//! One coordinator process: connect, set up streams, acquire shards, serve until shutdown.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use flowgrid_model::{Evaluator, Limits, ShardId};
use flowgrid_proto::{Subjects, API_QUEUE_GROUP};
use flowgrid_sdk::broker::{self, BrokerLimits};
use flowgrid_store::{Store, StoreLimits};
use flowgrid_store_redb::RedbStore;
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{self, Api};
use crate::config::CoordinatorConfig;
use crate::dispatch::Dispatcher;
use crate::error::{Error, Result};
use crate::metrics;
use crate::plans::PlanCache;
use crate::shard::{spawn_shard, NodeContext};

/// Longest wait for each of the last stop steps (draining publishes, flushing NATS): a
/// stop must finish even when the NATS server is already gone.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long startup waits for another coordinator of the same prefix to answer.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Shards opened and reloaded at once during startup: enough to overlap store reads.
const SHARD_OPENS_IN_FLIGHT_MAX: usize = 16;

/// Runs a coordinator on the embedded store until `shutdown` is cancelled.
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> Result<()> {
    config.validate().map_err(Error::Config)?;
    let cache_bytes_per_shard = config.store_cache_mb * 1024 * 1024 / config.shards as usize;
    let store =
        RedbStore::open(&config.data_dir, StoreLimits::default())?.with_cache_bytes_per_shard(cache_bytes_per_shard);
    run_with_store(config, store, shutdown).await
}

/// Runs a coordinator on `store` until `shutdown` is cancelled.
pub async fn run_with_store<S: Store>(config: CoordinatorConfig, store: S, shutdown: CancellationToken) -> Result<()> {
    config.validate().map_err(Error::Config)?;
    let started = Instant::now();
    serve_metrics(&config.metrics_addr)?;
    let nats = async_nats::ConnectOptions::new()
        .name("flowgrid-coordinator")
        .connect(&config.nats_url)
        .await
        .map_err(|source| Error::Connect { url: config.nats_url.clone(), source })?;
    let jetstream = async_nats::jetstream::new(nats.clone());
    let subjects = Subjects::new(config.prefix.clone());
    refuse_second_coordinator(&nats, &subjects).await?;
    let broker_limits = BrokerLimits::default();
    let tasks_stream = broker::tasks_stream(&jetstream, &subjects, &broker_limits).await?;
    let submit_stream = broker::submit_stream(&jetstream, &subjects, &broker_limits).await?;

    let limits = Limits::default();
    let evaluator = Arc::new(Evaluator::new(&limits));
    let plans = Arc::new(PlanCache::new(evaluator, limits.clone()));
    let workers_shutdown = CancellationToken::new();
    let (dispatcher, dispatcher_task) = Dispatcher::spawn(
        jetstream.clone(),
        tasks_stream,
        subjects.clone(),
        broker_limits.clone(),
        workers_shutdown.clone(),
    );
    let context = Arc::new(NodeContext {
        subjects: subjects.clone(),
        nats: nats.clone(),
        plans,
        dispatcher,
        store_limits: StoreLimits::default(),
        batch_events_max: config.batch_events_max,
        active_runs_max: config.active_runs_max,
        active_runs: AtomicU64::new(0),
    });

    let shards_shutdown = CancellationToken::new();
    let mut opened: Vec<_> = futures::stream::iter((0..config.shards).map(ShardId))
        .map(|shard| spawn_shard(&store, shard, context.clone(), config.shard_queue_max, shards_shutdown.clone()))
        .buffered(SHARD_OPENS_IN_FLIGHT_MAX)
        .try_collect()
        .await?;
    opened.sort_by_key(|(handle, _)| handle.shard);
    let (handles, shard_tasks): (Vec<_>, Vec<_>) = opened.into_iter().unzip();
    info!(shards = config.shards, elapsed_ms = started.elapsed().as_millis() as u64, "shards acquired");

    let api = Arc::new(Api { context: context.clone(), shards: handles, limits });
    let requests = nats
        .queue_subscribe(subjects.api_all(), API_QUEUE_GROUP.to_owned())
        .await
        .map_err(|source| Error::Nats { what: "subscribe to the API", source: Box::new(source) })?;
    let api_task = tokio::spawn(api::serve(api.clone(), requests, config.api_concurrency_max, shutdown.clone()));
    let submit_consumer = broker::submit_consumer(&submit_stream, &subjects, &broker_limits).await?;
    let submit_task = tokio::spawn(crate::submit::serve(api.clone(), submit_consumer, shutdown.clone()));
    info!(
        nats = %config.nats_url,
        prefix = %config.prefix,
        data_dir = %config.data_dir.display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "coordinator serving"
    );

    shutdown.cancelled().await;
    info!("coordinator stopping");
    let _ = api_task.await;
    let _ = submit_task.await;
    // Shards stop after their current commit; then the dispatcher drains its queue.
    shards_shutdown.cancel();
    for task in shard_tasks {
        let _ = task.await;
    }
    drop(api);
    workers_shutdown.cancel();
    // Publishes still awaiting acks are bounded by JetStream's ack timeout; what is cut
    // off here is republished when the shards reload.
    if tokio::time::timeout(STOP_WAIT, dispatcher_task).await.is_err() {
        tracing::warn!("task publishing did not drain in time; open tasks are republished on the next start");
    }
    // Without a server (it stopped first), a flush would wait for a reconnect forever.
    if let Err(error) = tokio::time::timeout(STOP_WAIT, nats.flush()).await.unwrap_or(Ok(())) {
        tracing::debug!(error = %error, "flush on stop failed");
    }
    info!("coordinator stopped");
    Ok(())
}

/// One coordinator serves a grid (a prefix) for now; a second one on another data
/// directory would split the runs' state. Refuses to start when a coordinator answers.
async fn refuse_second_coordinator(nats: &async_nats::Client, subjects: &Subjects) -> Result<()> {
    let probe = flowgrid_proto::encode(flowgrid_proto::Encoding::MsgPack, &flowgrid_proto::ListFlows {})
        .expect("an empty request encodes");
    let answered = tokio::time::timeout(PROBE_WAIT, nats.request(subjects.api("flow.list"), probe.into())).await;
    match answered {
        Ok(Ok(_)) => Err(Error::Config(format!(
            "another coordinator already serves prefix {:?} on this NATS server; one coordinator per grid is \
             supported for now: stop it, or give this grid another --prefix",
            subjects.prefix()
        ))),
        _ => Ok(()),
    }
}

fn serve_metrics(addr: &str) -> Result<()> {
    if addr == "off" {
        return Ok(());
    }
    let socket: std::net::SocketAddr =
        addr.parse().map_err(|_| Error::Config(format!("--metrics-addr {addr:?} is not host:port")))?;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(socket)
        .install()
        .map_err(|error| Error::Metrics { addr: addr.to_owned(), message: error.to_string() })?;
    metrics::describe();
    Ok(())
}
