//! `flowgrid coordinator`, `flowgrid worker` and `flowgrid http-worker`: long-running
//! processes that stop on ctrl-c or SIGTERM (a second signal exits at once).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use flowgrid_coordinator::CoordinatorConfig;
use flowgrid_sdk::{TaskHandler, Worker};

use crate::args::{HttpWorkerArgs, WorkerArgs};
use crate::demo_workers::DemoWorkers;
use crate::http_worker::{read_authorities, HttpSettings, HttpWorker};
use crate::Session;

/// Exit code after a second interrupt (128 + SIGINT).
const EXIT_INTERRUPTED: i32 = 130;

pub(crate) async fn coordinator(config: CoordinatorConfig) -> anyhow::Result<ExitCode> {
    config.validate().map_err(anyhow::Error::msg)?;
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let outcome = match config.fdb_cluster_file.clone() {
        Some(cluster_file) => on_foundationdb(config, &cluster_file, shutdown).await,
        None => flowgrid_coordinator::run(config, shutdown).await.map_err(anyhow::Error::from),
    };
    signals.abort();
    outcome.context("the coordinator stopped")?;
    Ok(ExitCode::SUCCESS)
}

/// Runs the coordinator with its shards in the FoundationDB cluster of `cluster_file`.
#[cfg(feature = "fdb")]
async fn on_foundationdb(
    config: CoordinatorConfig,
    cluster_file: &std::path::Path,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use flowgrid_store_fdb::{foundationdb, FdbStore};
    let path = cluster_file.to_str().with_context(|| format!("{}: not a UTF-8 path", cluster_file.display()))?;
    let store_id = fdb_store_id(cluster_file, &config.fdb_root)?;
    // Safety: booted once, here, for the life of the process; the guard stops the network
    // thread after every store is gone (the coordinator returns first).
    let _network = unsafe { foundationdb::boot() };
    info!(cluster_file = %path, root = %config.fdb_root, "shards in FoundationDB");
    loop {
        let store = FdbStore::open(Some(path), &config.fdb_root, flowgrid_store::StoreLimits::default()).await?;
        let outcome =
            flowgrid_coordinator::node::run_with_store(config.clone(), store, store_id.clone(), shutdown.clone()).await;
        match outcome {
            // As on the embedded store: the grid's streams and buckets are made anew.
            Err(flowgrid_coordinator::Error::GridLost) if !shutdown.is_cancelled() => {
                warn!("joining the grid again: its streams, buckets and shard claims are made anew");
            }
            outcome => return Ok(outcome?),
        }
    }
}

/// What a coordinator on FoundationDB names its store: the cluster its cluster file names
/// (`description:ID`, the part before `@`; not the file's path, which differs between
/// hosts) and the root. Every coordinator of a grid must name the same store.
#[cfg(any(feature = "fdb", test))]
fn fdb_store_id(cluster_file: &std::path::Path, root: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(cluster_file)
        .with_context(|| format!("cannot read the cluster file {}", cluster_file.display()))?;
    let line = text.lines().map(str::trim).find(|line| !line.is_empty() && !line.starts_with('#')).unwrap_or("");
    let Some((cluster, _)) = line.split_once('@') else {
        bail!(
            "{} is not a FoundationDB cluster file (it holds no `description:ID@address` line)",
            cluster_file.display()
        );
    };
    Ok(format!("fdb:{cluster}:{root}"))
}

#[cfg(not(feature = "fdb"))]
async fn on_foundationdb(
    _config: CoordinatorConfig,
    _cluster_file: &std::path::Path,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    bail!(
        "--fdb-cluster-file: this flowgrid was built without FoundationDB; build it with `cargo build --release -p \
         flowgrid-cli --features fdb` (needs libclang-dev to build and libfdb_c 7.3 to run), or leave the flag out to \
         keep the shards in --data-dir"
    )
}

pub(crate) async fn worker(args: WorkerArgs, session: &Session) -> anyhow::Result<ExitCode> {
    validate_worker(&args)?;
    info!(pools = ?args.pools, concurrency = args.concurrency, speed = args.speed, "demo workers starting");
    let handler = DemoWorkers::new(args.speed);
    let pacing = Pacing { max_rate: None, shutdown_grace: flowgrid_sdk::DEFAULT_SHUTDOWN_GRACE };
    serve_pools(session, "flowgrid-demo-worker", &args.pools, args.concurrency, pacing, handler).await
}

pub(crate) async fn http_worker(args: HttpWorkerArgs, session: &Session) -> anyhow::Result<ExitCode> {
    validate_pools(&args.pools, args.concurrency)?;
    let settings = HttpSettings {
        allowed: args.allow.clone(),
        timeout: Duration::from_millis(args.timeout_ms),
        body_bytes_max: usize::try_from(args.response_max_kb << 10).unwrap_or(usize::MAX),
        extra_roots: match &args.ca_file {
            Some(path) => read_authorities(path)?,
            None => Vec::new(),
        },
    };
    let handler = HttpWorker::new(settings).context("cannot set up the HTTP client")?;
    let allowed: Vec<&str> = args.allow.iter().map(reqwest::Url::as_str).collect();
    info!(pools = ?args.pools, concurrency = args.concurrency, allowed = ?allowed, "HTTP worker starting");
    let pacing = Pacing { max_rate: args.max_rate, shutdown_grace: Duration::from_millis(args.shutdown_grace_ms) };
    serve_pools(session, "flowgrid-http-worker", &args.pools, args.concurrency, pacing, handler).await
}

/// How a worker process paces its tasks: at most `max_rate` starts a second per pool, and
/// on a stop `shutdown_grace` for the tasks it holds.
struct Pacing {
    max_rate: Option<f64>,
    shutdown_grace: Duration,
}

/// The longest a stopping worker waits for what it sent to reach the server.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Serves `pools` with `handler` until a signal; one pool failing stops the others.
async fn serve_pools<H: TaskHandler + Clone>(
    session: &Session,
    name: &str,
    pools: &[String],
    concurrency: usize,
    pacing: Pacing,
    handler: H,
) -> anyhow::Result<ExitCode> {
    let nats = session.nats(name).await?;
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let mut workers = JoinSet::new();
    for pool in pools {
        let mut worker = Worker::new(nats.clone(), session.prefix.clone(), pool.clone())
            .concurrency(concurrency)
            .shutdown_grace(pacing.shutdown_grace);
        if let Some(rate) = pacing.max_rate {
            worker = worker.max_rate(rate);
        }
        let pool = pool.clone();
        let run = worker.run(handler.clone(), shutdown.clone());
        workers.spawn(async move { run.await.with_context(|| format!("worker of pool {pool} failed")) });
    }
    let mut failure = None;
    while let Some(joined) = workers.join_next().await {
        let outcome = joined.context("a worker task panicked").and_then(|outcome| outcome);
        if let Err(error) = outcome {
            // One pool failing stops the others: a half-served set of pools is a surprise.
            shutdown.cancel();
            failure.get_or_insert(error);
        }
    }
    signals.abort();
    // Without a server a flush would wait for a reconnect for good: what was not sent is
    // lost either way (results are sent again by nobody; their attempts time out).
    if nats.connection_state() == async_nats::connection::State::Connected {
        match tokio::time::timeout(FLUSH_WAIT, nats.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(error = %error, "flushing the NATS connection failed"),
            Err(_) => warn!("flushing the NATS connection took too long; stopping anyway"),
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The most tasks a worker process holds at once per pool (`--concurrency`).
const CONCURRENCY_MAX: usize = 100_000;

/// Refuses `--pools` with a name that is no pool's or that is given twice (each pool given
/// would get a worker of its own, doubling that pool's `--concurrency` and `--max-rate`),
/// and a `--concurrency` out of bounds.
fn validate_pools(pools: &[String], concurrency: usize) -> anyhow::Result<()> {
    let name_bytes_max = flowgrid_model::Limits::default().name_bytes_max;
    for (index, pool) in pools.iter().enumerate() {
        if !flowgrid_model::is_name(pool) {
            bail!("--pools: {pool:?} is not a pool name; use letters, digits, '-' and '_', comma-separated");
        }
        if pool.len() > name_bytes_max {
            bail!("--pools: a pool name is at most {name_bytes_max} bytes (as in flows); {pool:?} has {}", pool.len());
        }
        if pools[..index].contains(pool) {
            bail!("--pools: pool {pool:?} is given twice; list each pool once");
        }
    }
    if !(1..=CONCURRENCY_MAX).contains(&concurrency) {
        bail!("--concurrency is {concurrency}; use 1 to {CONCURRENCY_MAX} tasks at once per pool");
    }
    Ok(())
}

/// The largest `--speed` of the demo workers: their slowest task then takes hours.
const SPEED_MAX: f64 = 1_000.0;

fn validate_worker(args: &WorkerArgs) -> anyhow::Result<()> {
    validate_pools(&args.pools, args.concurrency)?;
    if !args.speed.is_finite() || !(0.0..=SPEED_MAX).contains(&args.speed) {
        bail!("--speed is {:?}; use 0 (no sleeping) or a factor up to {SPEED_MAX} such as 1.0", args.speed);
    }
    Ok(())
}

/// Cancels `shutdown` on the first ctrl-c or SIGTERM; exits the process on the second.
async fn cancel_on_signal(shutdown: CancellationToken) {
    if interrupted().await.is_err() {
        warn!("cannot listen for signals; stop the process with SIGKILL");
        return;
    }
    info!("shutdown requested; finishing in-flight work (signal again to exit at once)");
    shutdown.cancel();
    if interrupted().await.is_ok() {
        warn!("second signal; exiting without a clean shutdown");
        std::process::exit(EXIT_INTERRUPTED);
    }
}

/// Waits for ctrl-c or SIGTERM.
pub(crate) async fn interrupted() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            outcome = tokio::signal::ctrl_c() => outcome,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

#[cfg(test)]
mod tests {
    use super::{validate_pools, CONCURRENCY_MAX};

    /// A pool given twice would be served by two workers of the process, each with the
    /// whole `--concurrency` and `--max-rate`.
    #[test]
    fn a_pool_given_twice_is_refused() {
        let pools = |names: &[&str]| names.iter().map(|name| name.to_string()).collect::<Vec<_>>();
        assert!(validate_pools(&pools(&["http", "gpu-llm"]), 64).is_ok());
        for twice in [&["http", "http"][..], &["http", "gpu-llm", "http"]] {
            let refused = validate_pools(&pools(twice), 64).map_err(|error| error.to_string());
            assert_eq!(
                refused,
                Err("--pools: pool \"http\" is given twice; list each pool once".to_owned()),
                "{twice:?}"
            );
        }
        assert!(validate_pools(&pools(&["http"]), CONCURRENCY_MAX + 1).is_err());
    }
}

#[cfg(test)]
mod fdb_tests {
    use super::fdb_store_id;

    /// Two cluster files at other paths that name one cluster name one store; another
    /// cluster behind the same path is another store.
    #[test]
    fn a_foundationdb_store_is_named_by_its_cluster_not_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let (here, there) = (dir.path().join("fdb.cluster"), dir.path().join("copy.cluster"));
        std::fs::write(&here, "t:abc@127.0.0.1:4500\n").unwrap();
        std::fs::write(&there, "# a copy\nt:abc@127.0.0.1:4500,127.0.0.2:4500\n").unwrap();
        let id = fdb_store_id(&here, "flowgrid").unwrap();
        assert_eq!(id, "fdb:t:abc:flowgrid");
        assert_eq!(fdb_store_id(&there, "flowgrid").unwrap(), id);
        std::fs::write(&here, "u:xyz@127.0.0.1:4500\n").unwrap();
        assert_ne!(fdb_store_id(&here, "flowgrid").unwrap(), id);
        assert_ne!(fdb_store_id(&there, "other").unwrap(), id);
        std::fs::write(&here, "not a cluster file\n").unwrap();
        assert!(fdb_store_id(&here, "flowgrid").unwrap_err().to_string().contains("not a FoundationDB cluster file"));
    }
}
