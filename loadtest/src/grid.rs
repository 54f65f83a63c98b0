//! The grid under test: started here (nats-server on a random port with a temporary store
//! dir, and `--coordinators` coordinators from the release binary sharing one data dir) or
//! a running one given by URL; and,
//! for `chaos`, a [`Cluster`]: several coordinators sharing one data dir, whose processes
//! the harness kills, pauses, adds and removes, plus `flowgrid worker` processes.
//!
//! Every process started here is killed when its handle drops, which also happens on
//! ctrl-c (the main task returns) and on a panic (unwinding drops the handles).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowgrid_proto::FlowDeployed;
use flowgrid_sdk::NatsOptions;
use flowgrid_testkit::{free_port, nats_server_bin, scrape_metrics, wait_for_port, write_nats_config, Netns, Process};

use crate::args::GridArgs;

/// How long nats-server or the coordinator may take to come up.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// The grid a command measures.
pub struct Grid {
    pub nats_url: String,
    /// Credentials and TLS of a running grid's nats-server (none for one started here).
    nats_options: NatsOptions,
    pub prefix: String,
    coordinator_pids: Vec<u32>,
    /// The metrics endpoints of the coordinators this harness started.
    metrics_addrs: Vec<String>,
    // Dropped in field order: the coordinators stop before nats-server, then the directory goes.
    coordinators: Vec<Process>,
    nats: Option<Process>,
    _dir: Option<tempfile::TempDir>,
}

impl Grid {
    /// Connects to the grid at `--nats-url`, or starts one.
    pub async fn open(args: &GridArgs, extra_coordinator_args: &[String]) -> Result<Grid> {
        if let Some(pid) = args.coordinator_pid.filter(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            bail!("--coordinator-pid {pid}: no such process on this host (give the pid of a coordinator running here)");
        }
        match &args.nats_url {
            Some(url) => Ok(Grid {
                nats_url: url.clone(),
                nats_options: args.nats.clone(),
                prefix: args.prefix.clone(),
                coordinator_pids: args.coordinator_pid.into_iter().collect(),
                metrics_addrs: Vec::new(),
                coordinators: Vec::new(),
                nats: None,
                _dir: None,
            }),
            None => Grid::start(args, extra_coordinator_args).await,
        }
    }

    async fn start(args: &GridArgs, extra_coordinator_args: &[String]) -> Result<Grid> {
        let (dir, path) = work_dir(args.keep_dir.as_deref(), "flowgrid-loadtest-")?;
        let flowgrid = flowgrid_bin(args)?;
        let (nats, nats_url) = start_nats(&path, "127.0.0.1")?;

        let given_metrics_addr = flag_value(&args.coordinator_args, "--metrics-addr");
        if let Some(addr) = given_metrics_addr.as_deref().filter(|addr| *addr != "off" && args.coordinators > 1) {
            bail!(
                "--coordinator-args gives --metrics-addr {addr} to each of the {} coordinators, and only one can \
                 listen there: leave it out (each gets a free port) or give `--metrics-addr off`",
                args.coordinators
            );
        }
        let mut coordinators = Vec::new();
        let mut metrics_addrs = Vec::new();
        for index in 1..=args.coordinators {
            let mut command = Command::new(&flowgrid);
            without_shell_settings(&mut command)
                .arg("coordinator")
                .args(["--nats-url", &nats_url, "--prefix", &args.prefix])
                .arg("--data-dir")
                .arg(path.join("data"))
                .args(["--shards", &args.shards.to_string()])
                .args(args.coordinator_args.split_whitespace())
                .args(extra_coordinator_args)
                .env("FLOWGRID_LOG", std::env::var("FLOWGRID_LOG").unwrap_or_else(|_| "warn".to_owned()));
            // Served as in production, so that the report can read the coordinator's own timings.
            let metrics_addr = match &given_metrics_addr {
                Some(addr) => addr.clone(),
                None => {
                    let addr = format!("127.0.0.1:{}", free_port()?);
                    command.args(["--metrics-addr", &addr]);
                    addr
                }
            };
            if metrics_addr != "off" {
                metrics_addrs.push(metrics_addr);
            }
            let name = if args.coordinators == 1 { "coordinator".to_owned() } else { format!("coordinator-{index}") };
            coordinators.push(Process::spawn(&name, &mut command, &path)?.with_drop_grace(Duration::from_secs(5)));
        }
        let mut grid = Grid {
            nats_url,
            nats_options: NatsOptions::default(),
            prefix: args.prefix.clone(),
            coordinator_pids: coordinators.iter().map(Process::pid).collect(),
            metrics_addrs,
            coordinators,
            nats: Some(nats),
            _dir: dir,
        };
        grid.wait_until_serving().await?;
        eprintln!(
            "grid: nats-server {} and {} coordinator(s), pids {:?} ({}), logs in {}",
            grid.nats_url,
            grid.coordinator_pids.len(),
            grid.coordinator_pids,
            flowgrid.display(),
            path.display()
        );
        Ok(grid)
    }

    /// The Prometheus metrics of each coordinator whose endpoint is known, by address; an
    /// endpoint that does not answer is left out.
    pub async fn coordinator_metrics(&self) -> HashMap<String, String> {
        let addrs = self.metrics_addrs.clone();
        let scrape =
            move || addrs.into_iter().filter_map(|addr| Some((addr.clone(), scrape_metrics(&addr).ok()?))).collect();
        tokio::task::spawn_blocking(scrape).await.unwrap_or_default()
    }

    /// The coordinators' pids, when known (started here, or given by --coordinator-pid).
    pub fn coordinator_pids(&self) -> &[u32] {
        &self.coordinator_pids
    }

    /// The coordinators' resident set (summed over all of them), in MiB, when their pids are known.
    pub fn coordinator_rss_mb(&self) -> Option<f64> {
        if self.coordinator_pids.is_empty() {
            return None;
        }
        let kb: Option<u64> = self.coordinator_pids.iter().map(|pid| rss_kb(*pid)).sum();
        kb.map(|kb| kb as f64 / 1024.0)
    }

    /// CPU time (user and system) the coordinators have used so far, summed over all of
    /// them, when their pids are known.
    pub fn coordinator_cpu(&self) -> Option<Duration> {
        if self.coordinator_pids.is_empty() {
            return None;
        }
        self.coordinator_pids.iter().map(|pid| cpu_time(*pid)).sum()
    }

    pub async fn connect(&self, name: &str) -> Result<async_nats::Client> {
        connect(&self.nats_url, &self.nats_options, name).await
    }

    pub async fn client(&self) -> Result<flowgrid_sdk::Client> {
        let nats = self.connect("flowgrid-loadtest-client").await?;
        Ok(flowgrid_sdk::Client::new(nats, self.prefix.clone()))
    }

    /// Deploys the flow a command runs (`definition`), saying what to check when no
    /// coordinator answers.
    pub async fn deploy(&self, client: &flowgrid_sdk::Client, definition: &str) -> Result<FlowDeployed> {
        client.deploy(definition).await.map_err(|error| {
            if error.is_no_responders() {
                anyhow::anyhow!(
                    "no coordinator answers under prefix {:?} on NATS at {}: give the grid's --prefix, or start a \
                     coordinator",
                    self.prefix,
                    flowgrid_sdk::redact(&self.nats_url)
                )
            } else {
                anyhow::Error::new(error).context("deploy the load-test flow")
            }
        })
    }

    /// Stops the coordinators now (before the workers of the harness go away).
    pub fn stop(&mut self) {
        for mut coordinator in self.coordinators.drain(..) {
            coordinator.stop(Duration::from_secs(10));
        }
        if let Some(mut nats) = self.nats.take() {
            nats.stop(Duration::from_secs(5));
        }
    }

    async fn wait_until_serving(&mut self) -> Result<()> {
        let client = self.client().await?.with_retry_budget(Duration::ZERO);
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), client.flows()).await {
                // One coordinator serving is not all of them: none may have exited.
                return self.check_coordinators();
            }
            let exited = self.coordinators.iter_mut().any(Process::has_exited);
            if exited || Instant::now() > deadline {
                let tails: Vec<String> =
                    self.coordinators.iter().map(|c| format!("--- {}\n{}", c.name, c.log_tail(40))).collect();
                bail!(
                    "the coordinators did not serve (one exited or {STARTUP_DEADLINE:?} passed); logs:\n{}",
                    tails.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The coordinators' RSS now, in MB; an error when one of them exited, or when it
    /// cannot be read (a grid the harness did not start, without `--coordinator-pid`).
    pub fn coordinator_rss_mb_now(&mut self) -> Result<f64> {
        self.check_coordinators()?;
        self.coordinator_rss_mb().ok_or_else(|| {
            anyhow::anyhow!(
                "the coordinators' RSS cannot be read (/proc/<pid>/status of each): let the harness start the \
                     grid, or pass --coordinator-pid"
            )
        })
    }

    /// An error naming each coordinator started here that has exited, with its log's end:
    /// a measurement with one gone measured a smaller grid than it says.
    pub fn check_coordinators(&mut self) -> Result<()> {
        let exited: Vec<String> = self
            .coordinators
            .iter_mut()
            .filter_map(|coordinator| coordinator.has_exited().then_some(&*coordinator))
            .map(|coordinator| format!("--- {} exited; its log ends:\n{}", coordinator.name, coordinator.log_tail(20)))
            .collect();
        if exited.is_empty() {
            return Ok(());
        }
        bail!("{} of {} coordinators exited:\n{}", exited.len(), self.coordinators.len(), exited.join("\n"))
    }
}

/// The directory for a started grid's logs and data, named `prefix...`: with `keep`, a new
/// one under it (created if missing), kept after the command and printed; else a temporary
/// one, deleted when the returned handle drops. Never a directory used before: a grid started
/// on an earlier one's store would carry its waiting runs, its streams and its journal into
/// what is measured.
fn work_dir(keep: Option<&Path>, prefix: &str) -> Result<(Option<tempfile::TempDir>, PathBuf)> {
    match keep {
        Some(parent) => {
            std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
            let path = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in(parent)
                .with_context(|| format!("create a directory for this grid under {}", parent.display()))?
                .keep();
            eprintln!("logs and data kept in {}", path.display());
            Ok((None, path))
        }
        None => {
            let temp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            let path = temp.path().to_path_buf();
            Ok((Some(temp), path))
        }
    }
}

/// A NATS connection named `name` (the name shows in the server's connection list).
async fn connect(nats_url: &str, options: &NatsOptions, name: &str) -> Result<async_nats::Client> {
    Ok(options.connect(nats_url, name).await?)
}

/// VmRSS of a process, in KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user and system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, the state;
    // utime and stime are fields 14 and 15, in clock ticks.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks_per_s > 0).then(|| Duration::from_secs_f64(ticks as f64 / ticks_per_s as f64))
}

/// `--flowgrid-bin`, else `flowgrid` next to this binary (both live in target/release).
/// Leaves out of a `flowgrid` process the `FLOWGRID_*` settings of the harness's shell (but
/// `FLOWGRID_LOG`): a coordinator takes each of its flags from one, so an exported
/// `FLOWGRID_ACTIVE_RUNS_MAX` or `FLOWGRID_BATCH_EVENTS_MAX` would change what is measured
/// without the report showing it. Settings go through `--coordinator-args` instead.
fn without_shell_settings(command: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if name_text.starts_with("FLOWGRID_") && name_text != "FLOWGRID_LOG" {
            command.env_remove(&name);
        }
    }
    command
}

fn flowgrid_bin(args: &GridArgs) -> Result<PathBuf> {
    locate_flowgrid_bin(args.flowgrid_bin.as_deref())
}

/// nats-server with JetStream on a random port of `listen` (`0.0.0.0` for processes in other
/// network namespaces), its store under `dir/nats`, its log in `dir`; returns the process and
/// its loopback URL.
pub fn start_nats(dir: &Path, listen: &str) -> Result<(Process, String)> {
    let nats_port = free_port()?;
    let config = write_nats_config(dir, "")?;
    let mut nats = Process::spawn(
        "nats-server",
        Command::new(nats_server_bin())
            .arg("-c")
            .arg(config)
            .args(["-js", "-a", listen, "-p", &nats_port.to_string(), "-sd"])
            .arg(dir.join("nats")),
        dir,
    )
    .context("start nats-server: install it with `make setup` or set NATS_SERVER_BIN")?
    .with_drop_grace(Duration::from_secs(5));
    wait_for_port(nats_port, &mut nats, STARTUP_DEADLINE)?;
    Ok((nats, format!("nats://127.0.0.1:{nats_port}")))
}

/// `explicit`, else `flowgrid` next to this binary (both live in the same target dir).
pub fn locate_flowgrid_bin(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.exists() {
            bail!("{} is missing: build it with `cargo build --bins -p flowgrid-cli`", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("locate the flowgrid-loadtest binary")?;
    let bin = exe.with_file_name("flowgrid");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --bins -p flowgrid-cli` (`--release` for measurements; \
             make loadtest does) or pass --flowgrid-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// A coordinator process of a [`Cluster`]: killed hard, paused, resumed, stopped
/// gracefully, with its exit status kept. On drop it is resumed if paused, asked to stop,
/// and killed after a short grace.
pub struct CoordinatorProcess {
    /// `coordinator-<slot>`.
    pub name: String,
    /// This incarnation's log (a restarted coordinator gets a new one).
    pub log: PathBuf,
    pub started: Instant,
    /// When it was asked to leave (SIGTERM).
    pub leave_requested: Option<Instant>,
    child: std::process::Child,
    paused: bool,
    exit: Option<std::process::ExitStatus>,
}

impl CoordinatorProcess {
    fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Result<CoordinatorProcess> {
        let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {name}: {command:?}"))?;
        Ok(CoordinatorProcess {
            name: name.to_owned(),
            log,
            started: Instant::now(),
            leave_requested: None,
            child,
            paused: false,
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The exit status once the process has exited (reaped here).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit
    }

    pub fn has_exited(&mut self) -> bool {
        self.exit_status().is_some()
    }

    /// SIGKILL, then reap.
    pub fn kill_hard(&mut self) {
        if self.has_exited() {
            return;
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.exit = Some(status);
        }
        self.paused = false;
    }

    /// SIGSTOP: the process freezes with its connections and file locks held.
    pub fn pause(&mut self) -> Result<()> {
        self.signal("STOP")?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`CoordinatorProcess::pause`].
    pub fn resume(&mut self) -> Result<()> {
        if self.paused {
            self.signal("CONT")?;
            self.paused = false;
        }
        Ok(())
    }

    /// SIGTERM (resuming it first if paused): a graceful leave.
    pub fn terminate(&mut self) -> Result<()> {
        self.resume()?;
        self.signal("TERM")?;
        self.leave_requested.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// The last `lines` lines of this incarnation's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn signal(&mut self, signal: &str) -> Result<()> {
        // A process not yet reaped keeps its pid, so the signal cannot reach another one.
        if self.has_exited() {
            bail!("{} (pid {}) has already exited", self.name, self.pid());
        }
        let status =
            Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().context("run kill")?;
        if !status.success() {
            bail!("kill -{signal} {} ({}) failed: {status}", self.pid(), self.name);
        }
        Ok(())
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        if self.has_exited() {
            return;
        }
        let _ = self.terminate();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.has_exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_hard();
    }
}

/// What a [`Cluster`] runs.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub flowgrid: PathBuf,
    pub prefix: String,
    pub shards: u32,
    /// Extra flags of every coordinator (e.g. `--lease-ms 1500`).
    pub coordinator_args: Vec<String>,
    /// Logs and data in a new directory under this one instead of a temporary directory.
    pub keep_dir: Option<PathBuf>,
}

/// nats-server, coordinators sharing one data dir (`<dir>/data`), and `flowgrid worker`
/// processes; all on loopback, all stopped when the cluster drops.
pub struct Cluster {
    pub nats_url: String,
    pub spec: ClusterSpec,
    /// Coordinator slots; a slot is empty between a kill and its restart, or after a
    /// scale-in.
    pub coordinators: Vec<Option<CoordinatorProcess>>,
    /// Coordinators asked to leave (SIGTERM), until they exit.
    pub leaving: Vec<CoordinatorProcess>,
    // Dropped in field order: coordinators first (above), then workers, nats-server, and
    // the directory.
    workers: Vec<Process>,
    nats: Option<Process>,
    /// Where the coordinator of slot 0 runs, to be cut off from NATS ([`Cluster::set_cut`]).
    netns: Option<Netns>,
    dir: PathBuf,
    temp: Option<tempfile::TempDir>,
    incarnations: u64,
}

impl Cluster {
    /// Starts nats-server; coordinators and workers are started with their own calls. With
    /// `netns`, the coordinator of slot 0 runs in it, and nats-server listens beyond loopback
    /// to be reached from there.
    pub fn start_nats(spec: ClusterSpec, netns: Option<Netns>) -> Result<Cluster> {
        let (temp, dir) = work_dir(spec.keep_dir.as_deref(), "flowgrid-chaos-")?;
        std::fs::create_dir_all(dir.join("logs"))?;
        let (nats, nats_url) = start_nats(&dir, if netns.is_some() { "0.0.0.0" } else { "127.0.0.1" })?;
        Ok(Cluster {
            nats_url,
            spec,
            coordinators: Vec::new(),
            leaving: Vec::new(),
            workers: Vec::new(),
            nats: Some(nats),
            netns,
            dir,
            temp,
            incarnations: 0,
        })
    }

    /// Logs, data, and the NATS store live here.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The coordinators' shared data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Keeps the directory after the cluster drops (a temporary one is deleted otherwise);
    /// returns it.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(temp) = self.temp.take() {
            let _ = temp.keep();
        }
        self.dir.clone()
    }

    /// Starts a coordinator in `slot` (a new slot when `slot` is the number of slots).
    pub fn spawn_coordinator(&mut self, slot: usize) -> Result<u32> {
        anyhow::ensure!(slot <= self.coordinators.len(), "slot {slot} is past the end");
        if slot == self.coordinators.len() {
            self.coordinators.push(None);
        }
        anyhow::ensure!(self.coordinators[slot].is_none(), "slot {slot} is taken");
        self.incarnations += 1;
        let name = format!("coordinator-{slot}");
        let log = self.dir.join("logs").join(format!("{name}.{}.log", self.incarnations));
        let (mut command, nats_url) = match (&self.netns, self.cut_slot() == Some(slot)) {
            (Some(netns), true) => {
                let port = self.nats_url.rsplit(':').next().unwrap_or_default();
                (netns.command(&self.spec.flowgrid), netns.nats_url(port))
            }
            _ => (Command::new(&self.spec.flowgrid), self.nats_url.clone()),
        };
        without_shell_settings(&mut command)
            .arg("coordinator")
            .args(["--nats-url", &nats_url, "--prefix", &self.spec.prefix])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--shards", &self.spec.shards.to_string(), "--metrics-addr", "off"])
            .args(&self.spec.coordinator_args)
            .env("FLOWGRID_LOG", std::env::var("FLOWGRID_LOG").unwrap_or_else(|_| "info".to_owned()));
        let process = CoordinatorProcess::spawn(&name, &mut command, log)?;
        let pid = process.pid();
        self.coordinators[slot] = Some(process);
        Ok(pid)
    }

    /// The slot whose coordinator can be cut off from NATS: 0, when the cluster has a
    /// network namespace for it.
    pub fn cut_slot(&self) -> Option<usize> {
        self.netns.as_ref().map(|_| 0)
    }

    /// Cuts the coordinator of [`Cluster::cut_slot`] off from NATS (`true`), or joins it again.
    pub fn set_cut(&self, cut: bool) -> Result<()> {
        self.netns.as_ref().context("no coordinator of this cluster can be cut off")?.set_linked(!cut)
    }

    /// Starts `count` `flowgrid worker` processes serving `pool` without simulated delays.
    pub fn spawn_workers(&mut self, count: usize, pool: &str, concurrency: usize) -> Result<()> {
        for _ in 0..count {
            let name = format!("worker-{}", self.workers.len());
            let process = Process::spawn(
                &name,
                without_shell_settings(&mut Command::new(&self.spec.flowgrid))
                    .arg("worker")
                    .args(["--nats-url", &self.nats_url, "--prefix", &self.spec.prefix])
                    .args(["--pools", pool, "--concurrency", &concurrency.to_string(), "--speed", "0"]),
                &self.dir.join("logs"),
            )?
            .with_drop_grace(Duration::from_secs(5));
            self.workers.push(process);
        }
        Ok(())
    }

    /// Stops the workers (SIGTERM, then SIGKILL after `grace`).
    pub fn stop_workers(&mut self, grace: Duration) {
        for worker in &mut self.workers {
            worker.stop(grace);
        }
    }

    /// Workers that exited on their own (they should not).
    pub fn workers_exited(&mut self) -> Vec<String> {
        self.workers.iter_mut().filter_map(|worker| worker.has_exited().then(|| worker.name.clone())).collect()
    }

    /// Stops nats-server.
    pub fn stop_nats(&mut self) {
        if let Some(mut nats) = self.nats.take() {
            nats.stop(Duration::from_secs(5));
        }
    }

    pub async fn connect(&self, name: &str) -> Result<async_nats::Client> {
        connect(&self.nats_url, &NatsOptions::default(), name).await
    }

    pub async fn client(&self, name: &str) -> Result<flowgrid_sdk::Client> {
        Ok(flowgrid_sdk::Client::new(self.connect(name).await?, self.spec.prefix.clone()))
    }

    /// Waits until some coordinator answers `flow.list`.
    pub async fn wait_until_serving(&mut self) -> Result<()> {
        let client = self.client("flowgrid-chaos-probe").await?.with_retry_budget(Duration::ZERO);
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), client.flows()).await {
                return Ok(());
            }
            let exited: Vec<String> = self
                .coordinators
                .iter_mut()
                .flatten()
                .filter_map(|process| process.has_exited().then(|| process.name.clone()))
                .collect();
            if !exited.is_empty() || Instant::now() > deadline {
                bail!(
                    "no coordinator served within {STARTUP_DEADLINE:?} (exited: {exited:?}); logs:\n{}",
                    self.coordinator_logs(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The log tails of every running coordinator, for failure messages.
    pub fn coordinator_logs(&self, lines: usize) -> String {
        self.coordinators
            .iter()
            .flatten()
            .chain(self.leaving.iter())
            .map(|process| format!("--- {} ({})\n{}", process.name, process.log.display(), process.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The value after `flag` in space-separated `args` (`--flag value` or `--flag=value`).
fn flag_value(args: &str, flag: &str) -> Option<String> {
    let mut words = args.split_whitespace();
    while let Some(word) = words.next() {
        if word == flag {
            return words.next().map(str::to_owned);
        }
        if let Some(value) = word.strip_prefix(flag).and_then(|rest| rest.strip_prefix('=')) {
            return Some(value.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{flag_value, without_shell_settings, work_dir};

    /// A coordinator setting exported in the shell does not reach the processes the harness
    /// starts; the log level does.
    #[test]
    fn the_shells_settings_stay_out_of_the_grids_processes() {
        std::env::set_var("FLOWGRID_LOADTEST_TEST_SETTING", "5");
        std::env::set_var("FLOWGRID_LOG", "warn");
        let mut command = std::process::Command::new("true");
        without_shell_settings(&mut command);
        let removed: Vec<_> = command.get_envs().filter(|(_, value)| value.is_none()).map(|(name, _)| name).collect();
        assert!(removed.contains(&std::ffi::OsStr::new("FLOWGRID_LOADTEST_TEST_SETTING")), "{removed:?}");
        assert!(!removed.contains(&std::ffi::OsStr::new("FLOWGRID_LOG")), "{removed:?}");
    }

    /// A kept directory is not reused: a grid started on an earlier one's store would
    /// carry its runs, its streams and its journal into what is measured.
    #[test]
    fn each_grid_kept_gets_a_new_directory_of_its_own() {
        let keep = tempfile::tempdir().expect("temporary dir");
        let (first_handle, first) = work_dir(Some(keep.path()), "flowgrid-loadtest-").expect("first dir");
        std::fs::create_dir_all(first.join("data")).expect("an earlier grid's data");
        drop(first_handle);
        let (second_handle, second) = work_dir(Some(keep.path()), "flowgrid-loadtest-").expect("second dir");
        drop(second_handle);
        assert_ne!(first, second, "the second grid reuses the first one's directory");
        for dir in [&first, &second] {
            assert!(dir.starts_with(keep.path()) && dir.is_dir(), "{} kept under --keep-dir", dir.display());
        }
        assert!(!second.join("data").exists(), "the second grid starts on an empty directory");
    }

    #[test]
    fn flag_values_are_read_in_both_forms() {
        let args = "--active-runs-max 5 --metrics-addr 127.0.0.1:9 --x";
        assert_eq!(flag_value(args, "--metrics-addr").as_deref(), Some("127.0.0.1:9"));
        assert_eq!(flag_value("--metrics-addr=off", "--metrics-addr").as_deref(), Some("off"));
        assert_eq!(flag_value("--metrics-address 1", "--metrics-addr"), None);
        assert_eq!(flag_value("--metrics-addr", "--metrics-addr"), None);
    }
}
