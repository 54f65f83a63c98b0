//! Command-line flags. Flags that configure a process or a session (`--nats-url`,
//! `--prefix`, `--json`, worker and wait settings) are also read from `FLOWGRID_*`
//! variables; flags that name what one invocation acts on (a flow, a version, an input,
//! a cursor) are not, so that a stray variable cannot silently change which flow runs.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use flowgrid_coordinator::CoordinatorConfig;
use flowgrid_engine::RunStatus;
use flowgrid_model::{Labels, Millis};
use flowgrid_proto::ListRuns;
use flowgrid_sdk::{parse_duration, parse_start_time, parse_time, NatsOptions};

/// flowgrid: flow orchestration and task dispatch over NATS.
#[derive(Debug, Parser)]
#[command(name = "flowgrid", version, about, max_term_width = 110)]
pub struct Cli {
    /// NATS server to connect to.
    #[arg(long, global = true, env = "FLOWGRID_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Subject prefix of the grid.
    #[arg(long, global = true, env = "FLOWGRID_PREFIX", default_value = flowgrid_proto::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Print replies as JSON (for scripts) instead of tables.
    #[arg(long, global = true, env = "FLOWGRID_JSON")]
    pub json: bool,
    #[command(flatten)]
    pub nats: NatsOptions,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a coordinator until ctrl-c or SIGTERM.
    Coordinator(Box<CoordinatorConfig>),
    /// Run the built-in demo workers (generate, embed, transcode, ... and test tasks).
    Worker(WorkerArgs),
    /// Run a worker whose task `request` calls HTTP services, under the URL prefixes allowed.
    HttpWorker(HttpWorkerArgs),
    /// Deploy, check and inspect flow definitions.
    #[command(subcommand)]
    Flow(FlowCommand),
    /// Start, inspect, list, signal, pause, cancel and redrive runs.
    #[command(subcommand)]
    Run(RunCommand),
    /// Write the JSON Schemas of the wire messages, or check them for drift.
    Schemas(SchemasArgs),
    /// List the grid's coordinators: alive, draining or dead, shards served, heartbeat, uptime.
    Members,
    /// List the live workers: the pool each serves, its host and process, the tasks it runs
    /// now and at most, the tasks it finished, its uptime and last heartbeat.
    Workers {
        /// Only the workers of this pool.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Who serves the grid's shards: a summary per coordinator, every shard with --all, or
    /// one shard's last moves with --history.
    Shards(ShardsArgs),
    /// Coordinators, shard summary and the backlog of every pool and of durable submits.
    Status,
    /// Worker pools: how many of a pool's tasks may be out with its workers at once.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Async tasks: complete a task whose worker handed it off with a task token.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Serve a web UI of the grid: coordinators, backlog, flows drawn as graphs, runs step
    /// by step (read-only unless --actions).
    Ui(UiArgs),
    /// Audit a stopped grid's store for double-applied results, stale-epoch commits, history
    /// gaps and shards whose store lost what it held (exit 1 if any).
    Audit(AuditArgs),
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Complete an async task with its output (default: null) or an error: its step takes
    /// it as a worker's result. Exit 1 when the attempt is no longer open (completed
    /// already, timed out, or its run ended).
    Complete {
        /// The task token the worker handed off (`fgt1.`...).
        token: String,
        /// The task's output as JSON text.
        #[arg(long, conflicts_with_all = ["output_file", "error"])]
        output: Option<String>,
        /// File holding the output as JSON (`-` reads stdin).
        #[arg(long, conflicts_with = "error")]
        output_file: Option<PathBuf>,
        /// Fail the attempt with this error code instead.
        #[arg(long)]
        error: Option<String>,
        /// With --error: what went wrong, for people.
        #[arg(long, requires = "error", conflicts_with_all = ["output", "output_file"])]
        message: Option<String>,
        /// With --error: never retry it, whatever the step's retry policy says.
        #[arg(long, requires = "error", conflicts_with_all = ["output", "output_file"])]
        not_retryable: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Bound how many tasks of a pool are out with its workers at once, over all of them;
    /// the others wait in the stream, in order. For a GPU pool or a paid API with a quota.
    /// Takes effect at once, for the workers already running too.
    Limit {
        pool: String,
        /// At most this many tasks out at once (1 to 20000).
        #[arg(long, required_unless_present = "reset", conflicts_with = "reset")]
        max_in_flight: Option<i64>,
        /// Back to the default bound (20000).
        #[arg(long)]
        reset: bool,
    },
}

#[derive(Debug, Args)]
pub struct ShardsArgs {
    /// One line per shard: owner, state, epoch and how long since it last changed.
    #[arg(long)]
    pub all: bool,
    /// The last changes of this shard's claim, oldest first (the grid keeps 8): who held
    /// it, in which state, under which epoch, and when.
    #[arg(long, value_name = "SHARD", conflicts_with = "all")]
    pub history: Option<u32>,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Data directory of the grid's coordinators (they must all be stopped).
    #[arg(long, env = "FLOWGRID_DATA_DIR", default_value = ".grid/data")]
    pub data_dir: PathBuf,
    /// Number of shards of the grid, as given to the coordinators (default: what the data
    /// directory's grid.json says, else 64).
    #[arg(long, env = "FLOWGRID_SHARDS")]
    pub shards: Option<u32>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Pools to serve, comma-separated.
    #[arg(long, env = "FLOWGRID_POOLS", value_delimiter = ',', required = true)]
    pub pools: Vec<String>,
    /// Tasks held at once, per pool (1 to 100,000).
    #[arg(long, env = "FLOWGRID_CONCURRENCY", default_value_t = 64, value_parser = concurrency)]
    pub concurrency: usize,
    /// Scale of the simulated work time (0 = no sleeping, 2 = twice as slow; at most 1000).
    #[arg(long, env = "FLOWGRID_SPEED", default_value_t = 1.0)]
    pub speed: f64,
}

#[derive(Debug, Args)]
pub struct HttpWorkerArgs {
    /// Pools to serve, comma-separated; their steps use `task: request`.
    #[arg(long, env = "FLOWGRID_POOLS", value_delimiter = ',', default_value = "http")]
    pub pools: Vec<String>,
    /// A URL prefix requests may go to (its scheme, host and port, and a path starting with
    /// its path); repeat for more. Nothing else is called, redirects included.
    #[arg(long = "allow", env = "FLOWGRID_HTTP_ALLOW", value_delimiter = ',', required = true,
          value_parser = crate::http_worker::parse_allowed)]
    pub allow: Vec<reqwest::Url>,
    /// Requests out at once, per pool (1 to 100,000).
    #[arg(long, env = "FLOWGRID_CONCURRENCY", default_value_t = 64, value_parser = concurrency)]
    pub concurrency: usize,
    /// The longest one request may take, in ms; a task's `timeout_ms` may ask for less.
    #[arg(long, env = "FLOWGRID_HTTP_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub timeout_ms: u64,
    /// The most requests a second sent for each pool (a service's quota); the others wait
    /// their turn. Default: no bound.
    #[arg(long, env = "FLOWGRID_HTTP_MAX_RATE", value_parser = parse_rate)]
    pub max_rate: Option<f64>,
    /// PEM file of certificate authorities to trust besides the system's, for services
    /// whose certificates a private authority signed.
    #[arg(long, env = "FLOWGRID_HTTP_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// The largest response body taken, in KiB; a larger one fails the attempt
    /// (`payload_too_large`). At most 960: a task's output, the status and headers with it, is at most 1 MiB.
    #[arg(long, env = "FLOWGRID_HTTP_RESPONSE_MAX_KB", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=crate::http_worker::RESPONSE_MAX_KB_MAX))]
    pub response_max_kb: u64,
    /// On SIGTERM, how long the requests out may still take, in ms, before they are
    /// abandoned (their tasks go to another worker); raise it with `--timeout-ms` past 30 s.
    #[arg(long, env = "FLOWGRID_SHUTDOWN_GRACE_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Subcommand)]
pub enum FlowCommand {
    /// Deploy definition files (YAML or JSON; `-` reads stdin), each as a new version of its
    /// flow. With several, every file is checked first and none is deployed if one has a
    /// problem; then they are deployed in the order given.
    #[command(arg_required_else_help = true)]
    Deploy {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check definition files without a grid: every problem a deploy would refuse, each
    /// with its path (exit 2, an invalid definition, if any file has one). A trigger's stream
    /// is checked at deploy.
    #[command(arg_required_else_help = true)]
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Stop the flow's schedule and trigger from starting runs until `flow resume`.
    ///
    /// Its trigger's messages wait in their stream; the slots of its schedule meanwhile are
    /// skipped. Runs started through the API, and running runs, go on (`run pause --flow`
    /// pauses those).
    #[command(arg_required_else_help = true)]
    Pause {
        name: String,
        /// Why, shown with the flow.
        #[arg(long, default_value = "paused from the command line")]
        reason: String,
    },
    /// Let a paused flow's schedule and trigger start runs again.
    #[command(arg_required_else_help = true)]
    Resume {
        name: String,
        #[arg(long, default_value = "resumed from the command line")]
        reason: String,
    },
    /// List deployed flows.
    List,
    /// The concurrency limits in use, of one flow or all: runs going and queued under
    /// each key, and when a start rate lets the next one go.
    Limits {
        /// Only this flow's limits.
        name: Option<String>,
    },
    /// Run a definition file against test cases, without a grid: each case gives the run's
    /// input, the results of its task steps, the ends of its child runs and the data of its
    /// signals, and what the run must end with (exit 1 if any case fails).
    ///
    /// Timers (waits, retry backoffs, timeouts) fire at once, on a clock that jumps to
    /// them. Prints each case's run as `run get` does. docs/flows.md "Testing a flow" has
    /// the case format.
    #[command(arg_required_else_help = true)]
    Test {
        /// The definition (YAML or JSON).
        definition: PathBuf,
        /// Test case files (YAML or JSON), one run each.
        #[arg(required = true)]
        cases: Vec<PathBuf>,
    },
    /// Start the runs the flow's schedule would have started in a past span: one per
    /// slot, with the schedule's input and labels, oldest first.
    ///
    /// Each slot's run has the id the schedule gives it, so a slot that has its run already
    /// (the schedule started it, or an earlier backfill did) is not started again: run the
    /// same backfill again to finish one cut short. At most 10,000 slots at a time.
    #[command(arg_required_else_help = true)]
    Backfill {
        name: String,
        /// The earliest slot: 2026-12-01T00:00:00Z (UTC without an offset), 2026-12-01 (its
        /// midnight, UTC), or a duration ago (7d).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Millis,
        /// Slots before this time, in the same forms (default: now).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        until: Option<Millis>,
        /// Print the slots without starting runs.
        #[arg(long)]
        dry_run: bool,
    },
    /// What deploying a definition file would change in a flow (a unified diff against its
    /// latest version, or --version), or how two deployed versions differ (--to). Exit 0
    /// when they are the same, 1 when they differ, 2 when they could not be compared.
    #[command(arg_required_else_help = true)]
    Diff {
        name: String,
        /// A definition file (YAML or JSON; `-` reads stdin) to compare with the deployed version.
        #[arg(required_unless_present = "to")]
        file: Option<PathBuf>,
        /// The deployed version to compare (default: the latest).
        #[arg(long)]
        version: Option<u32>,
        /// Compare with this deployed version instead of a file.
        #[arg(long, conflicts_with = "file")]
        to: Option<u32>,
    },
    /// Print a flow's definition (YAML, or JSON with --json).
    #[command(visible_alias = "get")]
    Show {
        name: String,
        /// Version to show (default: the latest).
        #[arg(long)]
        version: Option<u32>,
    },
}

#[derive(Debug, Args)]
pub struct RunInput {
    /// Run input as JSON text.
    #[arg(long, conflicts_with = "input_file")]
    pub input: Option<String>,
    /// File holding the run input as JSON (`-` reads stdin).
    #[arg(long)]
    pub input_file: Option<PathBuf>,
    /// Starting again with the same flow and key returns the same run.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A label to find the run by, `key=value` (repeat for several): `run list --label`.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Start no step before this time: 2026-12-06T09:00:00Z (UTC without an offset),
    /// 2026-12-06 (its midnight, UTC), or a duration from now (90m, 2h). The run exists at
    /// once and waits, delayed; at most 366 days ahead.
    #[arg(long, value_name = "TIME", value_parser = parse_start_time)]
    pub at: Option<Millis>,
}

#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// Start a run and print its id; with --wait, wait for it to end and print it.
    Start {
        flow: String,
        /// Flow version (default: the latest).
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        input: RunInput,
        /// Wait for the run to end; exit 0 if it succeeded, 1 otherwise.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (e.g. 500ms, 60s, 5m; at most 366 days).
        #[arg(long, env = "FLOWGRID_WAIT_TIMEOUT", default_value = "60s", value_parser = parse_bounded_duration)]
        timeout: Duration,
    },
    /// Print a run: status, steps, output or error.
    Get { run_id: String },
    /// Print what was recorded for a run, oldest first: its start, then every result,
    /// failed attempt, timer, signal, cancel and redrive it took, each with its time.
    History {
        run_id: String,
        /// Only records after this one (a SEQ of an earlier listing).
        #[arg(long)]
        after: Option<u64>,
        /// Print at most this many records (default: all).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Print a run's steps as they start, retry and end, until the run ends (exit 0 if it
    /// succeeded, 1 otherwise or at the timeout).
    Watch {
        run_id: String,
        /// How long to watch (e.g. 60s, 10m; at most 366 days).
        #[arg(long, env = "FLOWGRID_WAIT_TIMEOUT", default_value = "10m", value_parser = parse_bounded_duration)]
        timeout: Duration,
    },
    /// Print a run's live output (what its workers emit while they work: a model's tokens,
    /// a job's log lines) from its start, as it comes, until the run ends (exit 0 if it
    /// succeeded, 1 otherwise or at the timeout). Texts are written as they are; a line on
    /// stderr names the step and attempt each piece comes from when that changes.
    Tail {
        run_id: String,
        /// Only this step's output.
        #[arg(long)]
        step: Option<String>,
        /// How long to follow the run (e.g. 60s, 10m; at most 366 days).
        #[arg(long, env = "FLOWGRID_WAIT_TIMEOUT", default_value = "10m", value_parser = parse_bounded_duration)]
        timeout: Duration,
    },
    /// List runs, newest first.
    List {
        /// Only runs of this flow.
        #[arg(long)]
        flow: Option<String>,
        /// Only runs in this status.
        #[arg(long, value_parser = parse_status)]
        status: Option<RunStatus>,
        /// Only the child runs that subflow steps of this run started.
        #[arg(long)]
        parent: Option<String>,
        #[command(flatten)]
        filter: RunFilter,
        /// Page size (1 to 1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Cursor printed by the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Send a signal to a signal step of a run: its data becomes the step's output.
    ///
    /// `run signal RUN_ID STEP` signals one run; `run signal --flow F STEP` (with --label,
    /// --since, --until, --limit) every running run of a flow that matches: those whose step
    /// waits take it, the others are left as they were.
    #[command(arg_required_else_help = true)]
    Signal {
        /// The run and its signal step (`RUN_ID STEP`), or with --flow the step alone.
        #[arg(required = true, num_args = 1..=2, value_names = ["RUN_ID", "STEP"])]
        targets: Vec<String>,
        /// Every running run of this flow that matches.
        #[arg(long)]
        flow: Option<String>,
        /// With --flow: at most this many runs.
        #[arg(long)]
        limit: Option<u64>,
        #[command(flatten)]
        filter: RunFilter,
        /// The signal's data as JSON text (default: null).
        #[arg(long, conflicts_with = "data_file")]
        data: Option<String>,
        /// File holding the signal's data as JSON (`-` reads stdin).
        #[arg(long)]
        data_file: Option<PathBuf>,
    },
    /// Stop runs: the runs named, or with --flow every running run of a flow that matches
    /// (queued ones too). Their open steps are cancelled and their workers told.
    #[command(arg_required_else_help = true)]
    Cancel {
        #[command(flatten)]
        runs: RunSelection,
        /// Why, recorded with each run.
        #[arg(long, default_value = "cancelled from the command line")]
        reason: String,
    },
    /// Run ended runs again: those that did not succeed from their failed steps, any run
    /// from a step on with --from.
    ///
    /// Steps that succeeded keep their outputs, unless --from names them or a step before
    /// them. The runs named, or with --flow or --status every run that matches.
    #[command(arg_required_else_help = true)]
    Redrive {
        /// Runs to redrive.
        #[arg(conflicts_with_all = ["flow", "status"])]
        run_ids: Vec<String>,
        /// Redrive every run of this flow that ended in --status (default: failed).
        #[arg(long)]
        flow: Option<String>,
        /// Redrive every run that ended in this status: failed, timed_out or cancelled
        /// (succeeded too with --from).
        #[arg(long, value_parser = parse_status)]
        status: Option<RunStatus>,
        /// Run this step again, and every step after it, even if it succeeded (repeat for
        /// several steps). A succeeded run is redriven only with a step named.
        #[arg(long = "from", value_name = "STEP")]
        from: Vec<String>,
        /// With --flow or --status: redrive at most this many (newest first).
        #[arg(long)]
        limit: Option<u64>,
        /// With --flow or --status: only the runs that also match these.
        #[command(flatten)]
        filter: RunFilter,
        /// Why, recorded in each run's history.
        #[arg(long, default_value = "redriven from the command line")]
        reason: String,
        /// Wait for the one run named to end again; exit 0 if it succeeded, 1 otherwise.
        #[arg(long, conflicts_with_all = ["flow", "status"])]
        wait: bool,
        /// How long --wait waits (e.g. 500ms, 60s, 5m; at most 366 days).
        #[arg(long, env = "FLOWGRID_WAIT_TIMEOUT", default_value = "60s", value_parser = parse_bounded_duration)]
        timeout: Duration,
    },
    /// Pause running runs: they start no step until resumed.
    ///
    /// What they started goes on (attempts out, their retries, a map's items, waits,
    /// child runs). The runs named, or with --flow every running run of the flow.
    #[command(arg_required_else_help = true)]
    Pause {
        #[command(flatten)]
        runs: RunSelection,
        /// Why, recorded in each run's history and shown with it.
        #[arg(long, default_value = "paused from the command line")]
        reason: String,
    },
    /// Resume paused runs: the steps they held start.
    #[command(arg_required_else_help = true)]
    Resume {
        #[command(flatten)]
        runs: RunSelection,
        /// Why, recorded in each run's history.
        #[arg(long, default_value = "resumed from the command line")]
        reason: String,
    },
    /// Durable start: store the request in JetStream even if no coordinator runs now.
    Submit {
        flow: String,
        /// Flow version (default: the latest when the run starts).
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        input: RunInput,
    },
    /// List the durable submits the grid refused (a flow not deployed, an input its schema
    /// refuses, a malformed message), newest first, with why. The grid keeps them a week
    /// (64 MiB at most); submit a corrected request again with `run submit`.
    Refused {
        /// How many to list (1 to 1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=flowgrid_sdk::REFUSED_SUBMITS_MAX as i64))]
        limit: u32,
    },
}

/// Runs named, or every running run of a flow.
#[derive(Debug, Args)]
pub struct RunSelection {
    /// Runs to act on.
    #[arg(conflicts_with = "flow")]
    pub run_ids: Vec<String>,
    /// Every running run of this flow (newest first).
    #[arg(long)]
    pub flow: Option<String>,
    /// With --flow: at most this many.
    #[arg(long)]
    pub limit: Option<u64>,
    /// With --flow: only the runs that also match these.
    #[command(flatten)]
    pub filter: RunFilter,
}

/// Which runs to list or act on, besides their flow and status.
#[derive(Debug, Default, Args)]
pub struct RunFilter {
    /// Only runs with this label, `key=value` (repeat: runs with all of them).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Only runs started at or after this time: 2026-12-05T10:00:00Z (UTC without an
    /// offset), 2026-12-05 (its midnight, UTC), or a duration ago (90m, 2h, 7d).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<Millis>,
    /// Only runs started before this time (the same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<Millis>,
}

impl RunFilter {
    /// Whether any of the filter's options was given.
    pub fn is_set(&self) -> bool {
        !self.labels.is_empty() || self.since.is_some() || self.until.is_some()
    }

    /// A run listing query for the runs that pass the filter; refused for a label given
    /// twice.
    pub fn query(self) -> anyhow::Result<ListRuns> {
        Ok(ListRuns {
            labels: labels_once(self.labels).map_err(|message| anyhow::anyhow!("--label: {message}"))?,
            since_ms: self.since,
            until_ms: self.until,
            ..Default::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct UiArgs {
    /// Address to serve the UI on (port 0 picks a free one).
    #[arg(long, env = "FLOWGRID_UI_LISTEN", default_value = "127.0.0.1:8480")]
    pub listen: std::net::SocketAddr,
    /// Let the UI change the grid: deploy flows, start runs, send signals, cancel runs.
    /// It has no login: only for a UI that only trusted users reach.
    #[arg(long, env = "FLOWGRID_UI_ACTIONS")]
    pub actions: bool,
    /// Let the HTTP API (`/api/...`) start, signal, pause, resume, cancel and redrive runs for requests that carry
    /// `Authorization: Bearer <TOKEN>` (at least 16 characters). Without it the API only
    /// reads. Prefer the variable: a flag shows in the process list.
    #[arg(long, env = "FLOWGRID_API_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub api_token: Option<String>,
    /// A browser origin (`https://app.example.com`) whose pages may call the HTTP API
    /// (CORS); repeat for several (the variable takes them comma-separated), `*` for any.
    /// The token is still needed for changes.
    #[arg(long = "api-cors-origin", env = "FLOWGRID_API_CORS_ORIGINS", value_delimiter = ',', value_name = "ORIGIN")]
    pub api_cors_origins: Vec<String>,
    /// A host name the UI answers for (`flowgrid.example.com`), besides its IP addresses and
    /// `localhost`; repeat for several (the variable takes them comma-separated). Requests
    /// for other names are refused, so that a site whose name resolves to this host (DNS
    /// rebinding) cannot read the pages or use their forms.
    #[arg(long = "allowed-host", env = "FLOWGRID_UI_ALLOWED_HOSTS", value_delimiter = ',', value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SchemasArgs {
    /// Directory of the schema files.
    #[arg(long, env = "FLOWGRID_SCHEMAS_DIR", default_value = "schemas")]
    pub out: PathBuf,
    /// Compare the files with the generated schemas instead of writing them.
    #[arg(long)]
    pub check: bool,
}

/// `key=value` (the value may be empty or hold `=`).
pub(crate) fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not a label; write key=value")),
    }
}

/// Labels given as `key=value` pairs, each key once: a second value for a key is refused
/// (a run has one value per label) rather than taking one of them unsaid.
pub(crate) fn labels_once(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for (key, value) in pairs {
        if let Some(first) = labels.get(&key) {
            return Err(format!("label {key} is given twice ({key}={first} and {key}={value}): give each label once"));
        }
        labels.insert(key, value);
    }
    Ok(labels)
}

/// Where a signal goes: a step of one run, or a step of a flow's runs.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SignalTarget {
    Run { run_id: String, step: String },
    Flow { flow: String, step: String },
}

/// The target of `run signal` from its positional arguments and `--flow`.
pub(crate) fn signal_target(targets: Vec<String>, flow: Option<String>) -> Result<SignalTarget, String> {
    match (<[String; 2]>::try_from(targets), flow) {
        (Ok([run_id, step]), None) => Ok(SignalTarget::Run { run_id, step }),
        (Err(mut targets), Some(flow)) if targets.len() == 1 => {
            Ok(SignalTarget::Flow { flow, step: targets.remove(0) })
        }
        (_, None) => Err("name the run and its signal step (`run signal RUN_ID STEP`), or a flow's runs with \
                          `--flow F STEP`"
            .to_owned()),
        (_, Some(_)) => Err("with --flow, give the step alone: the runs are the flow's".to_owned()),
    }
}

pub(crate) fn parse_status(text: &str) -> Result<RunStatus, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| format!("{text:?} is not a run status; use running, succeeded, failed, cancelled or timed_out"))
}

/// The longest duration an option takes (`--timeout`, and its `FLOWGRID_WAIT_TIMEOUT`):
/// a year and a day, past any wait that makes sense, and far within what a deadline on
/// the clock can hold.
const DURATION_MAX: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// A duration as [`parse_duration`] reads it, at most [`DURATION_MAX`].
fn parse_bounded_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration > DURATION_MAX {
        return Err(format!(
            "{:?} is longer than {} days, the longest duration taken: give a shorter one (e.g. 10m, 24h, 30d)",
            text.trim(),
            DURATION_MAX.as_secs() / (24 * 60 * 60)
        ));
    }
    Ok(duration)
}

/// The highest `--max-rate`: past what one worker process sends anyway, so a larger value
/// is a typo, not a bound.
const RATE_MAX: f64 = 100_000.0;

/// A request rate: a positive number a second, at most [`RATE_MAX`].
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (flowgrid_sdk::MAX_RATE_MIN..=RATE_MAX).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate: give requests a second, from {:.7} (one a day) to {RATE_MAX} (e.g. 50 or 0.5)",
            flowgrid_sdk::MAX_RATE_MIN
        )),
    }
}

/// A worker's tasks held at once: 1 to [`flowgrid_sdk::CONCURRENCY_MAX`].
fn concurrency(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(tasks) if (1..=flowgrid_sdk::CONCURRENCY_MAX).contains(&tasks) => Ok(tasks),
        _ => Err(format!("{text:?} is not a concurrency: give 1 to {} tasks at once", flowgrid_sdk::CONCURRENCY_MAX)),
    }
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
    fn a_worker_holds_1_to_concurrency_max_tasks_at_once() {
        let parse = |value: &str| Cli::try_parse_from(["flowgrid", "worker", "--pools", "a", "--concurrency", value]);
        assert!(parse("1").is_ok() && parse("100000").is_ok());
        for refused in ["0", "100001", "99999999999999999999", "many"] {
            let error = parse(refused).expect_err(refused).to_string();
            assert!(error.contains("give 1 to 100000 tasks at once"), "{refused}: {error}");
        }
    }

    #[test]
    fn statuses_parse_as_the_api_spells_them() {
        assert_eq!(parse_status("timed_out"), Ok(RunStatus::TimedOut));
        assert!(parse_status("done").is_err());
    }

    #[test]
    fn cluster_commands_take_their_flags_after_the_subcommand() {
        let cli = Cli::try_parse_from(["flowgrid", "shards", "--all", "--json"]).unwrap();
        assert!(cli.json);
        let Command::Shards(shards) = cli.command else { panic!("expected the shards command") };
        assert!(shards.all);
        let cli = Cli::try_parse_from(["flowgrid", "shards", "--history", "17"]).unwrap();
        let Command::Shards(shards) = cli.command else { panic!("expected the shards command") };
        assert_eq!(shards.history, Some(17));
        assert!(Cli::try_parse_from(["flowgrid", "shards", "--all", "--history", "1"]).is_err());
        let cli = Cli::try_parse_from(["flowgrid", "audit", "--data-dir", "d", "--shards", "8"]).unwrap();
        let Command::Audit(audit) = cli.command else { panic!("expected the audit command") };
        assert_eq!((audit.data_dir, audit.shards), (PathBuf::from("d"), Some(8)));
    }

    #[test]
    fn a_redrive_names_runs_or_selects_them_but_not_both() {
        let cli = Cli::try_parse_from(["flowgrid", "run", "redrive", "r1", "r2"]).unwrap();
        let Command::Run(RunCommand::Redrive { run_ids, flow, status, .. }) = cli.command else {
            panic!("expected run redrive")
        };
        assert_eq!((run_ids, flow, status), (vec!["r1".to_owned(), "r2".to_owned()], None, None));
        let cli = Cli::try_parse_from(["flowgrid", "run", "redrive", "--flow", "f", "--status", "timed_out"]).unwrap();
        let Command::Run(RunCommand::Redrive { run_ids, flow, status, .. }) = cli.command else {
            panic!("expected run redrive")
        };
        assert_eq!((run_ids.len(), flow.as_deref(), status), (0, Some("f"), Some(RunStatus::TimedOut)));
        assert!(Cli::try_parse_from(["flowgrid", "run", "redrive", "r1", "--flow", "f"]).is_err());
        assert!(Cli::try_parse_from(["flowgrid", "run", "redrive", "--flow", "f", "--wait"]).is_err());
        assert!(Cli::try_parse_from(["flowgrid", "run", "redrive"]).is_err(), "names no run");
        let cli = Cli::try_parse_from(["flowgrid", "run", "redrive", "r1", "--from", "a", "--from", "b"]).unwrap();
        let Command::Run(RunCommand::Redrive { from, .. }) = cli.command else { panic!("expected run redrive") };
        assert_eq!(from, ["a", "b"]);
    }

    #[test]
    fn a_pause_names_runs_or_a_flow_but_not_both() {
        let cli = Cli::try_parse_from(["flowgrid", "run", "pause", "r1", "r2"]).unwrap();
        let Command::Run(RunCommand::Pause { runs, .. }) = cli.command else { panic!("expected run pause") };
        assert_eq!((runs.run_ids, runs.flow), (vec!["r1".to_owned(), "r2".to_owned()], None));
        let cli = Cli::try_parse_from(["flowgrid", "run", "resume", "--flow", "f", "--limit", "3"]).unwrap();
        let Command::Run(RunCommand::Resume { runs, .. }) = cli.command else { panic!("expected run resume") };
        assert_eq!((runs.flow.as_deref(), runs.limit), (Some("f"), Some(3)));
        assert!(Cli::try_parse_from(["flowgrid", "run", "pause", "r1", "--flow", "f"]).is_err());
        assert!(Cli::try_parse_from(["flowgrid", "run", "resume"]).is_err(), "names no run");
    }

    #[test]
    fn a_label_given_twice_is_refused() {
        let cli =
            Cli::try_parse_from(["flowgrid", "run", "list", "--label", "a=1", "--label", "b=2", "--label", "a=3"])
                .unwrap();
        let Command::Run(RunCommand::List { filter, .. }) = cli.command else { panic!("expected run list") };
        let error = filter.query().unwrap_err().to_string();
        assert!(error.contains("label a is given twice (a=1 and a=3): give each label once"), "{error}");
        let pairs = [("a", "1"), ("b", "")].map(|(key, value)| (key.to_owned(), value.to_owned()));
        assert_eq!(labels_once(pairs).unwrap().len(), 2);
    }

    #[test]
    fn a_signal_names_the_run_and_the_step_or_a_flow_and_the_step_and_takes_data_one_way() {
        let cli = Cli::try_parse_from(["flowgrid", "run", "signal", "r1", "approve", "--data", "{}"]).unwrap();
        let Command::Run(RunCommand::Signal { targets, flow, data, data_file, .. }) = cli.command else {
            panic!("expected run signal")
        };
        assert_eq!((data.as_deref(), data_file), (Some("{}"), None));
        let target = signal_target(targets, flow).unwrap();
        assert_eq!(target, SignalTarget::Run { run_id: "r1".into(), step: "approve".into() });
        let cli =
            Cli::try_parse_from(["flowgrid", "run", "signal", "--flow", "f", "approve", "--label", "a=b"]).unwrap();
        let Command::Run(RunCommand::Signal { targets, flow, filter, .. }) = cli.command else { panic!("run signal") };
        assert_eq!(filter.labels, [("a".to_owned(), "b".to_owned())]);
        assert_eq!(
            signal_target(targets, flow).unwrap(),
            SignalTarget::Flow { flow: "f".into(), step: "approve".into() }
        );
        assert!(
            Cli::try_parse_from(["flowgrid", "run", "signal", "r1", "s", "--data", "1", "--data-file", "f"]).is_err()
        );
        assert!(Cli::try_parse_from(["flowgrid", "run", "signal", "r1", "s", "t"]).is_err(), "three targets");
        let step_alone = signal_target(vec!["r1".into()], None).unwrap_err();
        assert!(step_alone.contains("RUN_ID STEP"), "{step_alone}");
        let both = signal_target(vec!["r1".into(), "s".into()], Some("f".into())).unwrap_err();
        assert!(both.contains("the step alone"), "{both}");
    }

    #[test]
    fn flow_get_is_flow_show() {
        let cli = Cli::try_parse_from(["flowgrid", "flow", "get", "chain", "--version", "2"]).unwrap();
        let Command::Flow(FlowCommand::Show { name, version }) = cli.command else { panic!("expected flow show") };
        assert_eq!((name.as_str(), version), ("chain", Some(2)));
    }

    #[test]
    fn a_duration_past_the_bound_is_refused_with_the_bound() {
        let error = Cli::try_parse_from(["flowgrid", "run", "watch", "r", "--timeout", "10000000000000000000"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--timeout") && error.contains("longer than 366 days"), "{error}");
        for command in ["tail", "watch"] {
            assert!(Cli::try_parse_from(["flowgrid", "run", command, "r", "--timeout", "367d"]).is_err(), "{command}");
        }
        assert!(Cli::try_parse_from(["flowgrid", "run", "start", "f", "--wait", "--timeout", "367d"]).is_err());
        assert!(Cli::try_parse_from(["flowgrid", "run", "redrive", "r", "--wait", "--timeout", "367d"]).is_err());
        let cli = Cli::try_parse_from(["flowgrid", "run", "tail", "r", "--timeout", "366d"]).unwrap();
        let Command::Run(RunCommand::Tail { timeout, .. }) = cli.command else { panic!("expected run tail") };
        assert_eq!(timeout, DURATION_MAX);
    }

    #[test]
    fn pools_split_on_commas() {
        let cli = Cli::try_parse_from(["flowgrid", "worker", "--pools", "gpu-llm,cpu-media", "--speed", "0"]).unwrap();
        let Command::Worker(worker) = cli.command else { panic!("expected the worker command") };
        assert_eq!(worker.pools, ["gpu-llm", "cpu-media"]);
        assert_eq!(worker.speed, 0.0);
    }
}
