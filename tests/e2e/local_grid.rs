//! The local grid's script, `deploy/grid.sh` (what `make up`, `make scale` and `make down`
//! run), driven as a user would: each test has a grid of its own (a temporary `GRID_DIR`,
//! free ports, the nats-server of `make setup` or `NATS_SERVER_BIN`, the built `flowgrid`),
//! and stops it with `grid.sh down` when it ends, passing or failing.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use flowgrid_tests::{flowgrid_bin, free_port, repo_root};

/// How long one `grid.sh` command may take before the test kills it and fails.
const COMMAND_DEADLINE: Duration = Duration::from_secs(50);

/// `UP_TIMEOUT_SECONDS` of the commands that are meant to succeed.
const UP_TIMEOUT_SECONDS: &str = "20";

/// `LEAVE_TIMEOUT_SECONDS`: a coordinator's graceful leave, for `scale` and `down`.
const LEAVE_TIMEOUT_SECONDS: &str = "10";

/// How long a process killed with SIGKILL may take to be gone.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// Shards of a test grid: few, so that it settles quickly.
const SHARDS: &str = "8";

/// Tries at finding a run of free ports for the coordinators' metrics.
const PORT_TRIES: usize = 100;

/// The variables `grid.sh` reads, and make's own (an outer make's command-line variables
/// travel in MAKEFLAGS). None is inherited from the caller (under `make test` the Makefile
/// exports COORDINATORS and the ports), so each test says what it gives.
const GRID_VARIABLES: &[&str] = &[
    "COORDINATORS",
    "COORDINATORS_ORIGIN",
    "NATS_PORT",
    "METRICS_PORT",
    "UI_PORT",
    "SHARDS",
    "WORKER_POOLS",
    "FLOWGRID_BIN",
    "GRID_DIR",
    "UP_TIMEOUT_SECONDS",
    "LEAVE_TIMEOUT_SECONDS",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
];

/// What a command printed (stdout and stderr together) and whether it succeeded.
struct Outcome {
    success: bool,
    text: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.success { "succeeded" } else { "failed" };
        write!(f, "the command {verdict}; its output:\n{}", self.text)
    }
}

/// A process the grid started, told from a later one with the same pid by its start time.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct GridProcess {
    pid: u32,
    start_time: String,
}

impl GridProcess {
    /// The process's state letter (`R`, `S`, `Z`, ...) while it exists, zombie included.
    fn state(&self) -> Option<String> {
        let (state, start_time) = proc_stat(self.pid)?;
        (start_time == self.start_time).then_some(state)
    }

    /// True while it exists and is not a zombie.
    fn is_running(&self) -> bool {
        self.state().is_some_and(|state| state != "Z")
    }
}

/// The state and the start time of process `pid` (fields 3 and 22 of /proc/<pid>/stat; the
/// start time as `grid.sh` records it); `None` once it is gone.
fn proc_stat(pid: u32) -> Option<(String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's name, which may hold spaces and parentheses: fields 3 on.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    Some((fields.first()?.to_string(), fields.get(19)?.to_string()))
}

/// A local grid of `grid.sh` in a temporary `GRID_DIR`, on ports of its own.
struct LocalGrid {
    dir: tempfile::TempDir,
    nats_port: u16,
    metrics_port: u16,
    ui_port: u16,
    /// Every process a pid file of the grid named: none may outlive the test.
    seen: BTreeSet<GridProcess>,
}

impl LocalGrid {
    /// Picks the ports (room for `coordinators` metrics ports); starts nothing.
    fn new(coordinators: u16) -> Result<LocalGrid> {
        let nats_port = free_port()?;
        let ui_port = free_port()?;
        let metrics_port = free_port_run(coordinators, &[nats_port, ui_port])?;
        Ok(LocalGrid { dir: tempfile::tempdir()?, nats_port, metrics_port, ui_port, seen: BTreeSet::new() })
    }

    fn grid_dir(&self) -> PathBuf {
        self.dir.path().join("grid")
    }

    /// `program args...` in the repository with the grid's variables and `vars`.
    fn command(&self, program: &str, args: &[&str], vars: &[(&str, &str)]) -> Command {
        let mut command = Command::new(program);
        command.args(args).current_dir(repo_root());
        for name in GRID_VARIABLES {
            command.env_remove(name);
        }
        command
            .env("GRID_DIR", self.grid_dir())
            .env("NATS_PORT", self.nats_port.to_string())
            .env("METRICS_PORT", self.metrics_port.to_string())
            .env("UI_PORT", self.ui_port.to_string())
            .env("SHARDS", SHARDS)
            .env("WORKER_POOLS", "tests")
            .env("FLOWGRID_BIN", flowgrid_bin())
            .env("UP_TIMEOUT_SECONDS", UP_TIMEOUT_SECONDS)
            .env("LEAVE_TIMEOUT_SECONDS", LEAVE_TIMEOUT_SECONDS)
            .envs(vars.iter().copied());
        command
    }

    /// Runs `program args...` (bounded by COMMAND_DEADLINE) and notes the grid's processes.
    fn run(&mut self, program: &str, args: &[&str], vars: &[(&str, &str)]) -> Result<Outcome> {
        let output = self.dir.path().join("command.out");
        let file = File::create(&output)?;
        let mut command = self.command(program, args, vars);
        // Its own process group: on a timeout the test kills the command and its children.
        command.process_group(0).stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let mut child = command.spawn().with_context(|| format!("start {command:?}"))?;
        let deadline = Instant::now() + COMMAND_DEADLINE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
                let _ = child.wait();
                self.note_processes();
                let text = std::fs::read_to_string(&output).unwrap_or_default();
                bail!("{program} {args:?} did not end within {COMMAND_DEADLINE:?}; its output:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.note_processes();
        Ok(Outcome { success: status.success(), text: std::fs::read_to_string(&output)? })
    }

    /// `deploy/grid.sh action` with `vars`.
    fn grid(&mut self, action: &str, vars: &[(&str, &str)]) -> Result<Outcome> {
        self.run("bash", &["deploy/grid.sh", action], vars)
    }

    /// `grid.sh up` with `coordinators` coordinators; fails unless it succeeds.
    fn up(&mut self, coordinators: &str) -> Result<()> {
        let outcome = self.grid("up", &[("COORDINATORS", coordinators)])?;
        ensure!(outcome.success, "grid.sh up COORDINATORS={coordinators}: {outcome}");
        Ok(())
    }

    /// The process that component `name`'s pid file names, if any.
    fn process(&self, name: &str) -> Option<GridProcess> {
        let text = std::fs::read_to_string(self.grid_dir().join(format!("{name}.pid"))).ok()?;
        let mut words = text.split_whitespace();
        let pid = words.next()?.parse().ok()?;
        Some(GridProcess { pid, start_time: words.next()?.to_owned() })
    }

    /// Adds the processes of every pid file of the grid to `seen`.
    fn note_processes(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.grid_dir()) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(component) = name.strip_suffix(".pid") {
                if let Some(process) = self.process(component) {
                    self.seen.insert(process);
                }
            }
        }
    }

    /// SIGKILL to component `name` (as a crash would), then waits until it is gone, as
    /// `grid.sh` sees it (`kill -0` fails).
    fn kill(&self, name: &str) -> Result<GridProcess> {
        let process = self.process(name).with_context(|| format!("{name} has no pid file"))?;
        ensure!(process.is_running(), "{name} (pid {}) is not running", process.pid);
        Command::new("kill").args(["-KILL", &process.pid.to_string()]).status()?;
        let deadline = Instant::now() + EXIT_DEADLINE;
        while let Some(state) = process.state() {
            if Instant::now() >= deadline {
                // grid.sh started it in the background and exited: init must reap it.
                ensure!(
                    state != "Z",
                    "{name} (pid {}) is a zombie {EXIT_DEADLINE:?} after kill -9: nothing reaps orphaned processes \
                     on this machine, and grid.sh counts a zombie as running; run the tests under an init that \
                     reaps them (e.g. `docker run --init`)",
                    process.pid
                );
                bail!("{name} (pid {}) still runs {EXIT_DEADLINE:?} after kill -9", process.pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(process)
    }

    /// `grid.sh down`, then fails when a process the grid started still runs.
    fn finish(mut self) -> Result<()> {
        let outcome = self.grid("down", &[])?;
        ensure!(outcome.success, "grid.sh down: {outcome}");
        let left: Vec<u32> = self.seen.iter().filter(|process| process.is_running()).map(|p| p.pid).collect();
        ensure!(left.is_empty(), "processes of the grid outlived grid.sh down: {left:?}");
        Ok(())
    }
}

impl Drop for LocalGrid {
    /// A test that failed stops its grid too: `grid.sh down`, then SIGKILL to any process of
    /// the grid still running (after `finish`, there is none).
    fn drop(&mut self) {
        if self.seen.iter().all(|process| !process.is_running()) {
            return;
        }
        if let Err(error) = self.grid("down", &[]) {
            eprintln!("grid.sh down after the test: {error:#}");
        }
        for process in self.seen.iter().filter(|process| process.is_running()) {
            eprintln!("pid {} of the test's grid outlived grid.sh down: killing it", process.pid);
            let _ = Command::new("kill").args(["-KILL", &process.pid.to_string()]).status();
        }
    }
}

/// The first of `count` consecutive ports that were all free a moment ago, none of them in
/// `taken`.
fn free_port_run(count: u16, taken: &[u16]) -> Result<u16> {
    for _ in 0..PORT_TRIES {
        let first = free_port()?;
        let Some(last) = first.checked_add(count - 1) else { continue };
        let ports = first..=last;
        if ports.clone().any(|port| taken.contains(&port)) {
            continue;
        }
        if ports.into_iter().all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return Ok(first);
        }
    }
    bail!("found no {count} consecutive free ports on 127.0.0.1 in {PORT_TRIES} tries")
}

/// Going back after a failed scale-out stops the coordinator it started, not a healthy one
/// with a higher number: coordinator-2 crashed, `scale COORDINATORS=3` started a new
/// coordinator-2 that did not settle in time, and `scale COORDINATORS=2` (what it advised)
/// must leave coordinator-1 and coordinator-3 running.
#[test]
fn scaling_back_after_a_failed_scale_out_stops_what_it_started() -> Result<()> {
    let mut grid = LocalGrid::new(3)?;
    grid.up("3")?;
    let first = grid.process("coordinator-1").context("coordinator-1's pid file")?;
    let third = grid.process("coordinator-3").context("coordinator-3's pid file")?;
    let crashed = grid.kill("coordinator-2")?;

    // The shards must hold still for 4 polls 0.5 s apart: never within 1 s.
    let outcome = grid.grid("scale", &[("COORDINATORS", "3"), ("UP_TIMEOUT_SECONDS", "1")])?;
    assert!(!outcome.success, "a scale-out given UP_TIMEOUT_SECONDS=1 cannot settle in time: {outcome}");
    assert!(outcome.text.contains("'make scale COORDINATORS=2' goes back to 2"), "{outcome}");
    let started = grid.process("coordinator-2").context("the scale-out started coordinator-2 again")?;
    assert!(started != crashed && started.is_running(), "a new coordinator-2 runs");

    let outcome = grid.grid("scale", &[("COORDINATORS", "2")])?;
    assert!(outcome.success, "{outcome}");
    assert!(outcome.text.contains("stopping coordinator-2"), "{outcome}");
    assert!(!started.is_running(), "the coordinator the failed scale-out started is stopped: {outcome}");
    assert!(grid.process("coordinator-2").is_none(), "coordinator-2's pid file is gone");
    assert!(first.is_running(), "coordinator-1 still runs: {outcome}");
    assert!(third.is_running() && grid.process("coordinator-3") == Some(third), "coordinator-3 still runs: {outcome}");
    // A scale that succeeded forgets what the failed one started.
    assert!(!grid.grid_dir().join("scale-started").exists(), "scale-started is removed once a scale succeeds");
    grid.finish()
}

/// `up` on a grid that is up, whose web UI exited while another program took UI_PORT, stops
/// and says so: the UI it would start cannot listen, and the other program's port must not
/// pass for it.
#[test]
fn up_refuses_to_restart_the_ui_on_a_port_another_program_holds() -> Result<()> {
    let mut grid = LocalGrid::new(1)?;
    grid.up("1")?;
    grid.kill("ui")?;
    let other = TcpListener::bind(("127.0.0.1", grid.ui_port)).context("take the grid's UI port")?;

    let outcome = grid.grid("up", &[])?;
    assert!(!outcome.success, "the web UI cannot listen on a port another program holds: {outcome}");
    let port = format!("127.0.0.1:{}", grid.ui_port);
    assert!(outcome.text.contains(&format!("{port} (the grid's UI_PORT) is in use by another program")), "{outcome}");
    assert!(grid.process("ui").is_none_or(|ui| !ui.is_running()), "no UI runs: {outcome}");
    drop(other);
    grid.finish()
}

/// The watched processes of `wait_until` (deploy/lib.sh) are checked also when the probe
/// succeeds: a probe another program answers does not hide that the process exited.
#[test]
fn wait_until_fails_when_a_watched_process_exited_though_the_probe_succeeds() -> Result<()> {
    let script = r#"source deploy/lib.sh
true & pid=$!
wait "$pid"
WATCH_PIDS=$pid wait_until 5 "the probe" true"#;
    let output = Command::new("bash").args(["-c", script]).current_dir(repo_root()).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "wait_until succeeded though the process it watched had exited: {stderr}");
    assert!(stderr.contains("exited while waiting for the probe"), "{stderr}");
    Ok(())
}

/// A plain `make up` (COORDINATORS left at the Makefile's default, 1) on a grid running 2
/// coordinators does not advise `make scale COORDINATORS=1`, which would stop one; given a
/// number, it says how to get there.
#[test]
fn a_plain_make_up_on_a_running_grid_does_not_advise_scaling_to_the_default() -> Result<()> {
    let mut grid = LocalGrid::new(2)?;
    grid.up("2")?;
    // `-o tools -o build`: the grid is up and the binary built; only the `up` recipe runs.
    let make = |grid: &mut LocalGrid, extra: &[&str]| -> Result<Outcome> {
        let args: Vec<&str> = ["--no-print-directory", "-o", "tools", "-o", "build", "up"]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        grid.run("make", &args, &[])
    };

    let outcome = make(&mut grid, &[])?;
    assert!(outcome.success, "{outcome}");
    assert!(outcome.text.contains("grid is already up (nats, worker, 2 coordinator(s))"), "{outcome}");
    assert!(!outcome.text.contains("COORDINATORS=1"), "no advice to scale to the default: {outcome}");

    let outcome = make(&mut grid, &["COORDINATORS=3"])?;
    assert!(outcome.success, "{outcome}");
    assert!(outcome.text.contains("'make scale COORDINATORS=3' changes that"), "{outcome}");
    grid.finish()
}
