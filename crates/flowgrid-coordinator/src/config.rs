//! Coordinator configuration: every flag is also read from a `FLOWGRID_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Flags of `flowgrid coordinator`.
#[derive(Clone, Debug, clap::Args)]
pub struct CoordinatorConfig {
    /// NATS server to connect to.
    #[arg(long, env = "FLOWGRID_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Credentials and TLS for NATS (the `flowgrid` command's global `--nats-*` flags).
    #[arg(skip)]
    pub nats: flowgrid_sdk::NatsOptions,
    /// Subject prefix: every subject, stream and bucket of this grid lives under it.
    #[arg(long, env = "FLOWGRID_PREFIX", default_value = flowgrid_proto::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Directory of the embedded store (one file per shard).
    #[arg(long, env = "FLOWGRID_DATA_DIR", default_value = ".grid/data")]
    pub data_dir: PathBuf,
    /// Keep the shards in the FoundationDB cluster of this cluster file instead of the
    /// embedded store in `--data-dir` (every coordinator of the grid names the same cluster
    /// and `--fdb-root`). Needs a `flowgrid` built with `--features fdb` and libfdb_c 7.3.
    #[arg(long, env = "FLOWGRID_FDB_CLUSTER_FILE", value_name = "FILE")]
    pub fdb_cluster_file: Option<PathBuf>,
    /// The subspace of the FoundationDB cluster the grid's shards live under.
    #[arg(long, env = "FLOWGRID_FDB_ROOT", default_value = "flowgrid")]
    pub fdb_root: String,
    /// Page cache of the embedded store over all shards, in MiB (split evenly between the
    /// shard files). The hot state is in memory; this cache only speeds up reloads and lists.
    #[arg(long, env = "FLOWGRID_STORE_CACHE_MB", default_value_t = STORE_CACHE_MB_DEFAULT)]
    pub store_cache_mb: usize,
    /// The most bytes of waiting tasks JetStream's tasks stream holds over all pools, in
    /// MiB; past it, task publishes are refused and retried later. Used when this
    /// coordinator creates the stream (the first to start does): nats-server must have this
    /// much JetStream storage left.
    #[arg(long, env = "FLOWGRID_TASKS_STREAM_MAX_MB", default_value_t = 1024)]
    pub tasks_stream_max_mb: i64,
    /// The most bytes the task cache (workers' results of steps with `cache`, shared by the
    /// grid in a NATS KV bucket) holds, in MiB; when full, its oldest entries go. A
    /// coordinator makes the bucket, or sets its limit, when it first uses it: give every
    /// coordinator the same value.
    #[arg(long, env = "FLOWGRID_TASK_CACHE_MAX_MB", default_value_t = 1024)]
    pub task_cache_max_mb: i64,
    /// The most bytes of workers' live output (`Task::emit`, read by `flowgrid run tail`)
    /// the grid keeps, in MiB, for an hour at most; when full, the oldest goes. Used when
    /// a coordinator creates the stream (the first to start does).
    #[arg(long, env = "FLOWGRID_LIVE_OUTPUT_MAX_MB", default_value_t = 64)]
    pub live_output_max_mb: i64,
    /// How often the embedded store writes each shard's recent commits from its journal
    /// into the shard file, in ms. Longer: less CPU and disk per commit; more memory held
    /// and more journal to replay after a crash.
    #[arg(long, env = "FLOWGRID_CHECKPOINT_INTERVAL_MS", default_value_t = 1000)]
    pub checkpoint_interval_ms: u64,
    /// Number of virtual shards. Fixed when the grid is created: every coordinator of a grid
    /// must use the same value. A grid spreads over at most this many coordinators.
    #[arg(long, env = "FLOWGRID_SHARDS", default_value_t = flowgrid_model::SHARDS_DEFAULT)]
    pub shards: u32,
    /// Address of the Prometheus metrics endpoint (`/metrics`); `off` disables it.
    #[arg(long, env = "FLOWGRID_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// How often the pools' gauges (`flowgrid_pool_*`: tasks waiting, live workers) are
    /// read from the tasks stream and the workers bucket, in ms; `0` reads none. Only with
    /// metrics on.
    #[arg(long, env = "FLOWGRID_POOL_GAUGES_MS", default_value_t = 10_000)]
    pub pool_gauges_ms: u64,
    /// Events one shard applies per store transaction (group commit).
    #[arg(long, env = "FLOWGRID_BATCH_EVENTS_MAX", default_value_t = BATCH_EVENTS_MAX_DEFAULT)]
    pub batch_events_max: usize,
    /// Commands waiting per shard; past it, requests are refused as overloaded.
    #[arg(long, env = "FLOWGRID_SHARD_QUEUE_MAX", default_value_t = SHARD_QUEUE_MAX_DEFAULT)]
    pub shard_queue_max: usize,
    /// Runs in memory (started, not ended) over the whole coordinator; past it, new runs
    /// are refused as overloaded. Bounds the coordinator's memory.
    #[arg(long, env = "FLOWGRID_ACTIVE_RUNS_MAX", default_value_t = ACTIVE_RUNS_MAX_DEFAULT)]
    pub active_runs_max: u64,
    /// API requests handled at once; past it, requests are refused as overloaded.
    #[arg(long, env = "FLOWGRID_API_CONCURRENCY_MAX", default_value_t = API_CONCURRENCY_MAX_DEFAULT)]
    pub api_concurrency_max: usize,
    /// How long this coordinator may go without a heartbeat before the others take its
    /// shards, in ms. Shorter: faster takeover after a crash; longer: fewer false takeovers
    /// on a loaded host. Every coordinator announces its own.
    #[arg(long, env = "FLOWGRID_LEASE_MS", default_value_t = 1500)]
    pub lease_ms: u64,
    /// How long an ended run stays in the store (its record, history, snapshot and listing
    /// entry) after it ended, e.g. `30d`, `12h`; `0` keeps every run. Idempotency keys
    /// hold for as long as their run is kept.
    #[arg(long, env = "FLOWGRID_RETAIN_ENDED_RUNS", default_value = "30d", value_parser = flowgrid_sdk::parse_duration)]
    pub retain_ended_runs: std::time::Duration,
    /// On shutdown, how long to wait for every shard to be handed over before leaving
    /// anyway (the others then take the rest at once), in ms.
    #[arg(long, env = "FLOWGRID_DRAIN_TIMEOUT_MS", default_value_t = 15_000)]
    pub drain_timeout_ms: u64,
}

/// Defaults of the flags whose bounds name them (clap shows them in `--help` too).
const STORE_CACHE_MB_DEFAULT: usize = 16;
const BATCH_EVENTS_MAX_DEFAULT: usize = 1024;
const SHARD_QUEUE_MAX_DEFAULT: usize = 4096;
const ACTIVE_RUNS_MAX_DEFAULT: u64 = 200_000;
const API_CONCURRENCY_MAX_DEFAULT: usize = 4096;

/// The largest value of a count flag (`--batch-events-max`, `--shard-queue-max`,
/// `--api-concurrency-max`, `--active-runs-max`): far past what one process holds, and
/// within what the queues and semaphores they size take.
const COUNT_FLAG_MAX: u64 = 100_000_000;

/// The longest `--retain-ended-runs`: 100 years (`0` keeps every run for good).
const RETAIN_ENDED_RUNS_MAX: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The largest `--store-cache-mb`: 1 TiB.
const STORE_CACHE_MB_MAX: usize = 1 << 20;

/// The largest `--tasks-stream-max-mb` and `--task-cache-max-mb`: 16 TiB, far past any JetStream store, and small
/// enough that the limit in bytes fits the stream config's `i64`.
const TASKS_STREAM_MB_MAX: i64 = 16 << 20;

impl CoordinatorConfig {
    /// Checks values that clap cannot, with messages that say what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 65_536 {
            return Err(format!(
                "--shards is {}; use 1 to 65536 ({} is the default)",
                self.shards,
                flowgrid_model::SHARDS_DEFAULT
            ));
        }
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.split('.').all(|token| {
                !token.is_empty() && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !prefix_ok {
            return Err(format!(
                "--prefix {:?} is not a valid subject prefix; use dot-separated tokens of letters, digits, '-' and '_'",
                self.prefix
            ));
        }
        if self.metrics_addr != "off" && self.metrics_addr.parse::<SocketAddr>().is_err() {
            return Err(format!("--metrics-addr {:?} is not host:port (or `off`)", self.metrics_addr));
        }
        if self.retain_ended_runs > RETAIN_ENDED_RUNS_MAX {
            return Err(format!(
                "--retain-ended-runs is {} days; use 0 (keep every run) or at most 100 years (30d is the default)",
                self.retain_ended_runs.as_secs() / 86_400
            ));
        }
        let counts = [
            ("--batch-events-max", self.batch_events_max as u64, BATCH_EVENTS_MAX_DEFAULT as u64),
            ("--shard-queue-max", self.shard_queue_max as u64, SHARD_QUEUE_MAX_DEFAULT as u64),
            ("--api-concurrency-max", self.api_concurrency_max as u64, API_CONCURRENCY_MAX_DEFAULT as u64),
            ("--active-runs-max", self.active_runs_max, ACTIVE_RUNS_MAX_DEFAULT),
        ];
        for (flag, value, default) in counts {
            if !(1..=COUNT_FLAG_MAX).contains(&value) {
                return Err(format!("{flag} is {value}; use 1 to {COUNT_FLAG_MAX} ({default} is the default)"));
            }
        }
        if self.store_cache_mb > STORE_CACHE_MB_MAX {
            return Err(format!(
                "--store-cache-mb is {}; use 0 to {STORE_CACHE_MB_MAX} ({STORE_CACHE_MB_DEFAULT} is the default)",
                self.store_cache_mb
            ));
        }
        if !(1..=TASKS_STREAM_MB_MAX).contains(&self.tasks_stream_max_mb) {
            return Err(format!(
                "--tasks-stream-max-mb is {}; use 1 to {TASKS_STREAM_MB_MAX} (1024 is the default)",
                self.tasks_stream_max_mb
            ));
        }
        if !(1..=TASKS_STREAM_MB_MAX).contains(&self.task_cache_max_mb) {
            return Err(format!(
                "--task-cache-max-mb is {}; use 1 to {TASKS_STREAM_MB_MAX} (1024 is the default)",
                self.task_cache_max_mb
            ));
        }
        if !(1..=TASKS_STREAM_MB_MAX).contains(&self.live_output_max_mb) {
            return Err(format!(
                "--live-output-max-mb is {}; use 1 to {TASKS_STREAM_MB_MAX} (64 is the default)",
                self.live_output_max_mb
            ));
        }
        if !(50..=60_000).contains(&self.checkpoint_interval_ms) {
            return Err(format!(
                "--checkpoint-interval-ms is {}; use 50 to 60000 (1000 is the default)",
                self.checkpoint_interval_ms
            ));
        }
        if self.pool_gauges_ms != 0 && !(100..=600_000).contains(&self.pool_gauges_ms) {
            return Err(format!(
                "--pool-gauges-ms is {}; use 100 to 600000, or 0 for none (10000 is the default)",
                self.pool_gauges_ms
            ));
        }
        if !(300..=60_000).contains(&self.lease_ms) {
            return Err(format!("--lease-ms is {}; use 300 to 60000 (1500 is the default)", self.lease_ms));
        }
        Ok(())
    }
}
