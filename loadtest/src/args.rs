//! Command-line flags. Every flag is also read from a `FLOWGRID_LT_*` variable, except the
//! ones that pick what a run measures (workload, mode), so that a stray variable cannot
//! silently change which figure is reported.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use flowgrid_sdk::parse_duration;

use crate::service_time::ServiceTime;

/// flowgrid-loadtest: drive a flowgrid grid with simulated workers and measure it.
#[derive(Debug, Parser)]
#[command(name = "flowgrid-loadtest", version, about, max_term_width = 110)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Throughput and latency of one workload, after the broker floor of the same sizes.
    Run(RunArgs),
    /// Coordinator memory per active run: start runs whose tasks no worker takes.
    Memory(MemoryArgs),
    /// Overload: workers stop, starts continue; report rejections and RSS over time.
    Overload(OverloadArgs),
    /// Chaos: several coordinators under steady load while they are killed, paused, cut off
    /// from NATS (as root), added and removed; then every accepted run is checked and the
    /// store audited.
    Chaos(ChaosArgs),
    /// Every performance target of docs/performance.md in one go: each step on a grid of its
    /// own, then a table of target, measured value and verdict.
    Targets(TargetsArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// One task per run.
    Single,
    /// A chain of `--tasks-per-run` task steps.
    Chain,
    /// A map over `--tasks-per-run` items, merged by a transform.
    Map,
    /// A chain on pool lt-a next to a map on pool lt-b, joined by a transform.
    Mix,
}

impl Workload {
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Single => "single",
            Workload::Chain => "chain",
            Workload::Map => "map",
            Workload::Mix => "mix",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoopMode {
    /// Starts scheduled at `--rate` per second from a fixed clock; latency counts from the
    /// scheduled time (no coordinated omission).
    Open,
    /// `--concurrency` loops, each starting a run and waiting for its end.
    Closed,
}

/// Where the grid comes from.
#[derive(Clone, Debug, Args)]
pub struct GridArgs {
    /// Target a running grid at this NATS URL instead of starting one.
    #[arg(long, env = "FLOWGRID_LT_NATS_URL")]
    pub nats_url: Option<String>,
    /// Credentials and TLS for a running grid's nats-server.
    #[command(flatten)]
    pub nats: flowgrid_sdk::NatsOptions,
    /// Subject prefix of the grid.
    #[arg(long, env = "FLOWGRID_LT_PREFIX", default_value = flowgrid_proto::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Coordinator process to read RSS from when targeting a running grid.
    #[arg(long, env = "FLOWGRID_LT_COORDINATOR_PID")]
    pub coordinator_pid: Option<u32>,
    /// The `flowgrid` binary for a started grid (default: target/release/flowgrid next to
    /// this binary).
    #[arg(long, env = "FLOWGRID_BIN")]
    pub flowgrid_bin: Option<PathBuf>,
    /// Virtual shards of a started grid.
    #[arg(long, env = "FLOWGRID_LT_SHARDS", default_value_t = flowgrid_model::SHARDS_DEFAULT)]
    pub shards: u32,
    /// Coordinators of a started grid; they share its data dir and its shards.
    #[arg(long, env = "FLOWGRID_LT_COORDINATORS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub coordinators: u32,
    /// Extra flags for a started coordinator, space-separated
    /// (e.g. "--active-runs-max 50000 --batch-events-max 4096"). Its metrics endpoint is on a
    /// free port of 127.0.0.1 unless these flags give "--metrics-addr" (the report reads the
    /// coordinator's commit and publish times from it).
    #[arg(long, env = "FLOWGRID_LT_COORDINATOR_ARGS", allow_hyphen_values = true, default_value = "")]
    pub coordinator_args: String,
    /// Keep the started grid's logs and data in a new directory under this one (printed)
    /// instead of a temporary one; each command gets its own, so that no grid starts on an
    /// earlier one's store.
    #[arg(long, env = "FLOWGRID_LT_KEEP_DIR")]
    pub keep_dir: Option<PathBuf>,
}

/// `--tasks-per-run` at most: the items a map may have (a chain may be as long).
pub const TASKS_PER_RUN_MAX: u32 = flowgrid_model::limits::MAP_ITEMS_MAX as u32;

/// Simulated workers per pool, by default.
pub const WORKERS_PER_POOL_DEFAULT: usize = 4;

/// `run --mode open` without `--rate`: run starts per second.
const RATE_DEFAULT: f64 = 1_000.0;

/// `run --mode closed` without `--concurrency`: runs in flight.
const CONCURRENCY_DEFAULT: usize = 512;
/// Tasks one simulated worker holds at once, by default.
pub const WORKER_CONCURRENCY_DEFAULT: usize = 256;

/// The simulated workers.
#[derive(Clone, Debug, Args)]
pub struct WorkerArgs {
    /// Simulated workers per pool (each with its own NATS connection).
    #[arg(long, env = "FLOWGRID_LT_WORKERS_PER_POOL", default_value_t = WORKERS_PER_POOL_DEFAULT)]
    pub workers_per_pool: usize,
    /// Tasks one simulated worker holds at once.
    #[arg(long, env = "FLOWGRID_LT_WORKER_CONCURRENCY", default_value_t = WORKER_CONCURRENCY_DEFAULT)]
    pub worker_concurrency: usize,
    /// Fixed service time per task (e.g. 0ms, 2ms).
    #[arg(long, env = "FLOWGRID_LT_SERVICE_TIME", default_value = "0ms", value_parser = ServiceTime::parse_fixed,
          conflicts_with = "service_time_dist")]
    pub service_time: ServiceTime,
    /// Service time distribution: `exp:2ms` (exponential, mean 2 ms), `uniform:1ms..3ms`, or `fixed:1ms`.
    #[arg(long, env = "FLOWGRID_LT_SERVICE_TIME_DIST", value_parser = ServiceTime::parse_distribution)]
    pub service_time_dist: Option<ServiceTime>,
}

impl WorkerArgs {
    pub fn service_time(&self) -> ServiceTime {
        self.service_time_dist.clone().unwrap_or_else(|| self.service_time.clone())
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// What each run does.
    #[arg(long, value_enum, default_value_t = Workload::Chain)]
    pub workload: Workload,
    /// Chain length, or map items (for `mix`, both); `single` ignores it.
    #[arg(long, default_value_t = 3)]
    pub tasks_per_run: u32,
    /// Open loop (target rate) or closed loop (fixed concurrency).
    #[arg(long, value_enum, default_value_t = LoopMode::Closed)]
    pub mode: LoopMode,
    /// Open loop: run starts per second (default 1000).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Closed loop: runs in flight at once (default 512). 512 keeps the grid's queues deep
    /// enough to batch (with 256, chain-of-3 reached about a tenth less), with run latencies
    /// still well under 100 ms; 2,048 (the broker floor's depth) gives more throughput at
    /// several times the latency.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Starts sent together in one `run.start_many` request, at most, by the SDK's
    /// StartBatcher (a lone start still goes out at once); 1 sends each start as its own
    /// `run.start` request.
    #[arg(long, default_value_t = flowgrid_sdk::DEFAULT_START_BATCH_MAX as u32,
          value_parser = clap::value_parser!(u32).range(1..=flowgrid_sdk::START_MANY_RUNS_MAX as i64))]
    pub start_batch_max: u32,
    /// Start requests awaiting their reply at once, at most: batches of the SDK's
    /// StartBatcher (fewer make larger batches, more make each start wait less for a request
    /// to go out), or with --start-batch-max 1 single starts.
    #[arg(long, default_value_t = flowgrid_sdk::DEFAULT_START_REQUESTS_MAX as u32,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub start_requests_max: u32,
    /// Give each start an idempotency key, as a durable submit always has: the
    /// coordinator then also looks each start's run id up in the store.
    #[arg(long)]
    pub idempotency_keys: bool,
    /// Measured time, after the warm-up.
    #[arg(long, env = "FLOWGRID_LT_DURATION", default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before the measurement starts; the harness records nothing of it. The
    /// coordinator's own p50 and p99 (its exporter's last 40-60 s) reach into it when the
    /// measured time is shorter than a minute: the report says how far.
    #[arg(long, env = "FLOWGRID_LT_WARMUP", default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// After the measured time, how long runs still in flight may take to finish.
    #[arg(long, env = "FLOWGRID_LT_DRAIN", default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Measure the broker floor before and after the engine run.
    #[arg(long, env = "FLOWGRID_LT_FLOOR", default_value_t = true, overrides_with = "no_floor")]
    pub floor: bool,
    /// Skip the broker floor.
    #[arg(long, overrides_with = "floor")]
    pub no_floor: bool,
    /// Measured time of the broker floor, on each side of the engine run.
    #[arg(long, env = "FLOWGRID_LT_FLOOR_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub floor_duration: Duration,
    /// After the engine run, time the same open loop with no engine for --floor-duration:
    /// a responder in the coordinator's place publishes each run's next task as soon as a
    /// result arrives. Its latencies are the broker's and the workers' share of the
    /// engine's at this rate. Open loop, `single` and `chain` only.
    #[arg(long, env = "FLOWGRID_LT_LATENCY_FLOOR")]
    pub latency_floor: bool,
    /// Share of finished runs checked with `run.get` (must have succeeded).
    #[arg(long, env = "FLOWGRID_LT_VERIFY_SHARE", default_value_t = 0.01)]
    pub verify_share: f64,
    /// Print only the final JSON line on stdout (no table).
    #[arg(long)]
    pub json_only: bool,
    /// Sample the coordinators with `perf` from the start of the measured window and write
    /// a flame graph (coordinator.svg) and the folded stacks into this directory; prints
    /// where their CPU went. Needs `perf` (or $PERF) and coordinators the harness started
    /// (or --coordinator-pid).
    #[arg(long, value_name = "DIR")]
    pub profile: Option<std::path::PathBuf>,
    /// How long --profile samples (at most the measured duration).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub profile_duration: Duration,
    /// No progress line on stderr.
    #[arg(long, env = "FLOWGRID_LT_QUIET")]
    pub quiet: bool,
    #[command(flatten)]
    pub grid: GridArgs,
    #[command(flatten)]
    pub workers: WorkerArgs,
}

impl RunArgs {
    pub fn floor_enabled(&self) -> bool {
        self.floor && !self.no_floor
    }

    /// An open loop's starts per second.
    pub fn rate(&self) -> f64 {
        self.rate.unwrap_or(RATE_DEFAULT)
    }

    /// A closed loop's runs in flight.
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(CONCURRENCY_DEFAULT)
    }

    /// A closed loop's runs in flight; `None` in an open loop, whose depth the rate sets.
    pub fn runs_in_flight(&self) -> Option<usize> {
        (self.mode == LoopMode::Closed).then(|| self.concurrency())
    }

    /// Checks values clap cannot, with messages that say what to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.tasks_per_run >= 1, "--tasks-per-run must be at least 1");
        anyhow::ensure!(
            self.tasks_per_run <= TASKS_PER_RUN_MAX,
            "--tasks-per-run is at most {TASKS_PER_RUN_MAX} (the map item limit)"
        );
        match self.mode {
            LoopMode::Open => anyhow::ensure!(
                self.concurrency.is_none(),
                "--concurrency sets a closed loop's runs in flight: give --rate with --mode open, or --mode closed"
            ),
            LoopMode::Closed => anyhow::ensure!(
                self.rate.is_none(),
                "--rate sets an open loop's starts per second: give --concurrency with --mode closed (the default), \
                 or --mode open"
            ),
        }
        anyhow::ensure!(
            self.rate().is_finite() && self.rate() > 0.0,
            "--rate must be a positive number of runs per second"
        );
        anyhow::ensure!(self.concurrency() >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive (e.g. 60s)");
        anyhow::ensure!((0.0..=1.0).contains(&self.verify_share), "--verify-share is a fraction from 0 to 1");
        if self.latency_floor {
            anyhow::ensure!(
                matches!(self.workload, Workload::Single | Workload::Chain),
                "--latency-floor mirrors `single` and `chain` runs only (a map's fan-in is the engine's work)"
            );
            anyhow::ensure!(
                self.mode == LoopMode::Open,
                "--latency-floor times an open loop at --rate: add --mode open"
            );
        }
        if self.latency_floor || self.floor_enabled() {
            anyhow::ensure!(!self.floor_duration.is_zero(), "--floor-duration must be positive (e.g. 10s)");
        }
        if self.profile.is_some() {
            anyhow::ensure!(!self.profile_duration.is_zero(), "--profile-duration must be positive (e.g. 5s)");
            anyhow::ensure!(
                self.grid.nats_url.is_none() || self.grid.coordinator_pid.is_some(),
                "--profile samples the coordinators by their pids, and those of a running grid (--nats-url) are not \
                 known: give --coordinator-pid, or leave out --nats-url to let the harness start the grid"
            );
            crate::profile::check()?;
        }
        validate_workers(&self.workers)
    }
}

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Runs to start; their tasks go to a pool without workers, so they all stay active.
    #[arg(long, default_value_t = 100_000)]
    pub runs: u64,
    /// Start requests in flight at once.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// Wait after the last start before reading RSS again (lets the dispatcher settle).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub settle: Duration,
    #[command(flatten)]
    pub grid: GridArgs,
}

#[derive(Debug, Args)]
pub struct OverloadArgs {
    /// How long starts continue after the workers stopped.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load with workers running before they stop.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Start requests per second (open loop), before and after the workers stop.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// A started coordinator's `--active-runs-max` (default: the coordinator's own).
    #[arg(long)]
    pub active_runs_max: Option<u64>,
    #[command(flatten)]
    pub grid: GridArgs,
    #[command(flatten)]
    pub workers: WorkerArgs,
}

impl OverloadArgs {
    /// Checks values clap cannot, with messages that say what to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        validate_workers(&self.workers)?;
        anyhow::ensure!(self.rate.is_finite() && self.rate > 0.0, "--rate must be positive");
        // Against a running grid it would be reported but not applied.
        anyhow::ensure!(
            self.active_runs_max.is_none() || self.grid.nats_url.is_none(),
            "--active-runs-max sets the bound of a coordinator the harness starts: against a running grid \
             (--nats-url) leave it out, and start that grid's coordinators with --active-runs-max instead"
        );
        Ok(())
    }
}

/// A step of `targets`: one harness run and the targets it measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Step {
    /// Chain-of-3 runs, closed loop as deep as the floor's (2,048), with the broker floor:
    /// tasks/s and ratio.
    Chain,
    /// 1-task runs, closed loop as deep as the floor's (2,048), with the broker floor:
    /// tasks/s and ratio.
    Single,
    /// Chain-of-3 runs, open loop at half the `chain` step's runs/s: latencies.
    HalfLoad,
    /// A map over 10,000 items, one run at a time: time to finish.
    Map,
    /// 100,000 runs waiting on a worker: coordinator memory per run.
    Memory,
    /// Workers stopped, starts going on at 4,000/s for 70 s: rejections and a memory plateau.
    Overload,
}

impl Step {
    pub const ALL: [Step; 6] = [Step::Chain, Step::Single, Step::HalfLoad, Step::Map, Step::Memory, Step::Overload];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Chain => "chain",
            Step::Single => "single",
            Step::HalfLoad => "half-load",
            Step::Map => "map",
            Step::Memory => "memory",
            Step::Overload => "overload",
        }
    }
}

#[derive(Debug, Args)]
pub struct TargetsArgs {
    /// Measured time of each throughput step (`chain`, `single`); `half-load` lasts half of
    /// it and `map` a sixth (at least 3 s).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load before each run step's measurement starts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Measured time of the broker floor, on each side of a throughput step.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub floor_duration: Duration,
    /// Steps to run, comma-separated; they run in the order listed under --help.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Step::ALL)]
    pub steps: Vec<Step>,
    /// Exit with status 1 when a target is missed (otherwise only when a step fails to run).
    #[arg(long)]
    pub fail_on_miss: bool,
    /// The `flowgrid` binary (default: target/release/flowgrid next to this binary).
    #[arg(long, env = "FLOWGRID_BIN")]
    pub flowgrid_bin: Option<PathBuf>,
    /// Extra flags for every started coordinator, space-separated.
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub coordinator_args: String,
}

impl TargetsArgs {
    /// Checks values clap cannot, with messages that say what to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.steps.contains(&Step::HalfLoad) {
            anyhow::ensure!(
                self.duration >= Duration::from_secs(2),
                "--duration must be at least 2s (the half-load step lasts half of it)"
            );
        } else {
            anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive (e.g. 60s)");
        }
        anyhow::ensure!(!self.floor_duration.is_zero(), "--floor-duration must be positive (e.g. 10s)");
        anyhow::ensure!(
            !self.steps.contains(&Step::HalfLoad) || self.steps.contains(&Step::Chain),
            "the half-load step runs at half the chain step's maximum: add `chain` to --steps"
        );
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// How long faults are injected under load.
    #[arg(long, env = "FLOWGRID_LT_DURATION", default_value = "600s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Coordinators sharing the grid (at least 3: one may be down while two keep serving).
    #[arg(long, default_value_t = 3)]
    pub coordinators: usize,
    /// Run starts per second (open loop, one idempotency key per run).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seed of the fault schedule (default: from the clock; printed, so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The `flowgrid` binary (default: `flowgrid` next to this binary).
    #[arg(long, env = "FLOWGRID_BIN")]
    pub flowgrid_bin: Option<PathBuf>,
    /// Virtual shards of the grid.
    #[arg(long, env = "FLOWGRID_LT_SHARDS", default_value_t = 32)]
    pub shards: u32,
    /// Passed to every coordinator as `--lease-ms` (default: the coordinator's own); a
    /// pause lasts the lease plus one second.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Mean time between two fault actions (each action waits 80..120% of it).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub fault_interval: Duration,
    /// `flowgrid worker` processes serving the flow's pool.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Tasks one worker process holds at once.
    #[arg(long, default_value_t = 64)]
    pub worker_concurrency: usize,
    /// After the faults end, how long accepted runs may take to finish.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Subject prefix of the grid.
    #[arg(long, default_value = flowgrid_proto::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Keep logs and data in a new directory under this one (printed; default: a temporary
    /// one, kept only when the run finds a problem).
    #[arg(long, env = "FLOWGRID_LT_KEEP_DIR")]
    pub keep_dir: Option<PathBuf>,
}

impl ChaosArgs {
    /// Checks values clap cannot, with messages that say what to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.coordinators >= 3,
            "--coordinators must be at least 3: one is killed or paused at a time and two must keep serving"
        );
        anyhow::ensure!(
            self.rate.is_finite() && self.rate > 0.0,
            "--rate must be a positive number of runs per second"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive (e.g. 600s)");
        anyhow::ensure!(self.shards >= 1, "--shards must be at least 1");
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(self.worker_concurrency >= 1, "--worker-concurrency must be at least 1");
        anyhow::ensure!(self.fault_interval >= Duration::from_millis(100), "--fault-interval must be at least 100ms");
        Ok(())
    }
}

pub fn validate_workers(workers: &WorkerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(workers.workers_per_pool >= 1, "--workers-per-pool must be at least 1");
    anyhow::ensure!(workers.worker_concurrency >= 1, "--worker-concurrency must be at least 1");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn chaos_defaults_are_valid_and_two_coordinators_are_refused() {
        let cli = Cli::try_parse_from(["flowgrid-loadtest", "chaos", "--duration", "45s", "--seed", "7"]).unwrap();
        let Command::Chaos(chaos) = cli.command else { panic!("expected chaos") };
        assert_eq!((chaos.duration, chaos.coordinators, chaos.seed), (Duration::from_secs(45), 3, Some(7)));
        chaos.validate().unwrap();
        let cli = Cli::try_parse_from(["flowgrid-loadtest", "chaos", "--coordinators", "2"]).unwrap();
        let Command::Chaos(chaos) = cli.command else { panic!("expected chaos") };
        assert!(chaos.validate().unwrap_err().to_string().contains("at least 3"));
    }

    #[test]
    fn targets_run_every_step_unless_told_and_half_load_needs_chain() {
        let cli = Cli::try_parse_from(["flowgrid-loadtest", "targets"]).unwrap();
        let Command::Targets(targets) = cli.command else { panic!("expected targets") };
        assert_eq!(targets.steps, Step::ALL);
        targets.validate().unwrap();
        let cli = Cli::try_parse_from(["flowgrid-loadtest", "targets", "--steps", "half-load,map"]).unwrap();
        let Command::Targets(targets) = cli.command else { panic!("expected targets") };
        assert!(targets.validate().unwrap_err().to_string().contains("add `chain`"));
        assert!(Cli::try_parse_from(["flowgrid-loadtest", "targets", "--steps", "chain,fast"]).is_err());
    }

    #[test]
    fn the_latency_floor_needs_an_open_loop_of_single_or_chain_runs() {
        let validate = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["flowgrid-loadtest", "run", "--latency-floor"], args].concat()).unwrap();
            let Command::Run(run) = cli.command else { panic!("not a run") };
            run.validate().map_err(|error| error.to_string())
        };
        assert!(validate(&["--mode", "open", "--workload", "chain"]).is_ok());
        assert!(validate(&["--mode", "open", "--workload", "single"]).is_ok());
        let closed = validate(&["--mode", "closed"]).unwrap_err();
        assert!(closed.contains("--mode open"), "{closed}");
        let map = validate(&["--mode", "open", "--workload", "map"]).unwrap_err();
        assert!(map.contains("`single` and `chain`"), "{map}");
        let map = validate(&["--workload", "map"]).unwrap_err();
        assert!(map.contains("`single` and `chain`"), "the workload is told first: {map}");
    }

    #[test]
    fn a_rate_goes_with_an_open_loop_and_a_concurrency_with_a_closed_one() {
        let validate = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["flowgrid-loadtest", "run"], args].concat()).unwrap();
            let Command::Run(run) = cli.command else { panic!("not a run") };
            run.validate().map(|()| (run.rate(), run.concurrency())).map_err(|error| error.to_string())
        };
        assert_eq!(validate(&[]), Ok((1_000.0, 512)));
        assert_eq!(validate(&["--mode", "open", "--rate", "50"]), Ok((50.0, 512)));
        assert!(validate(&["--rate", "50"]).unwrap_err().contains("--rate sets an open loop's"));
        assert!(validate(&["--mode", "open", "--concurrency", "8"])
            .unwrap_err()
            .contains("--concurrency sets a closed"));
        assert!(validate(&["--mode", "open", "--rate", "0"]).unwrap_err().contains("positive"));
        // The broker floor runs by default, so its duration is checked without --latency-floor.
        assert!(validate(&["--floor-duration", "0s"]).unwrap_err().contains("--floor-duration must be positive"));
        assert!(validate(&["--floor-duration", "0s", "--no-floor"]).is_ok());
    }

    #[test]
    fn targets_without_half_load_take_a_short_duration() {
        let validate = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["flowgrid-loadtest", "targets"], args].concat()).unwrap();
            let Command::Targets(targets) = cli.command else { panic!("expected targets") };
            targets.validate().map_err(|error| error.to_string())
        };
        assert!(validate(&["--steps", "single", "--duration", "1s"]).is_ok());
        assert!(validate(&["--steps", "chain,half-load", "--duration", "1s"]).unwrap_err().contains("at least 2s"));
    }

    /// The pids of a running grid's coordinators are known only from --coordinator-pid: a
    /// profile without one is refused before the run, not after it.
    #[test]
    fn a_profile_of_a_running_grid_needs_the_coordinators_pid() {
        let cli = Cli::try_parse_from([
            "flowgrid-loadtest",
            "run",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--profile",
            "profile-out",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else { panic!("expected run") };
        let refused = run.validate().unwrap_err().to_string();
        assert!(refused.contains("give --coordinator-pid"), "{refused}");
    }

    #[test]
    fn an_overload_bound_is_refused_for_a_grid_the_harness_does_not_start() {
        let parse = |more: &[&str]| {
            let cli =
                Cli::try_parse_from([&["flowgrid-loadtest", "overload", "--active-runs-max", "4000"], more].concat())
                    .unwrap();
            let Command::Overload(overload) = cli.command else { panic!("expected overload") };
            overload.validate()
        };
        assert!(parse(&[]).is_ok());
        let refused = parse(&["--nats-url", "nats://127.0.0.1:4222"]).unwrap_err().to_string();
        assert!(refused.contains("leave it out"), "{refused}");
    }

    #[test]
    fn floor_can_be_switched_off() {
        let cli = Cli::try_parse_from(["flowgrid-loadtest", "run", "--no-floor"]).unwrap();
        let Command::Run(run) = cli.command else { panic!("expected run") };
        assert!(!run.floor_enabled());
    }
}
