//! Test support: a real `nats-server` per test on a random port with a temporary store
//! directory, and real `flowgrid` coordinator and worker processes. Every process is
//! killed when its handle drops, so a failing test leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowgrid_proto::{ShardClaim, ShardState};
use flowgrid_sdk::{RunId, RunView, StepView};
pub use flowgrid_testkit::{
    free_port, header, http_exchange, http_get, http_post_form, http_post_json, metric_value, nats_server_bin,
    scrape_metrics, wait_for_port, write_nats_config, Netns, Process,
};

/// How long a process may take to come up before the test fails.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// Runs nats-server with JetStream on `listen`:`port`, its config and store under `dir`,
/// and waits until it accepts connections.
fn spawn_nats(dir: &Path, listen: &str, port: u16) -> Result<Process> {
    let mut nats = Process::spawn(
        "nats-server",
        Command::new(nats_server_bin())
            .arg("-c")
            .arg(dir.join("nats-server.conf"))
            .args(["-js", "-a", listen, "-p", &port.to_string(), "-sd"])
            .arg(dir.join("nats")),
        dir,
    )
    .context("start nats-server: install it with `make setup` or set NATS_SERVER_BIN")?;
    wait_for_port(port, &mut nats, STARTUP_DEADLINE)?;
    Ok(nats)
}

/// The `flowgrid` binary built next to this test binary (`make test` builds it first).
pub fn flowgrid_bin() -> PathBuf {
    if let Ok(path) = std::env::var("FLOWGRID_BIN") {
        // Tests run in their package directory: a relative path means the repository's.
        let path = PathBuf::from(path);
        return if path.is_relative() { repo_root().join(path) } else { path };
    }
    let exe = std::env::current_exe().expect("current test binary");
    // target/debug/deps/e2e-xxxx -> target/debug/flowgrid
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("flowgrid");
    assert!(bin.exists(), "{} is missing: run `cargo build --bins` first (make test does)", bin.display());
    bin
}

/// Shards of a test grid. Placement is rendezvous hashing, so with two coordinators each
/// shard lands on either one at random: with 8 shards all of them went to one coordinator
/// in 1 of 128 grids, and the tests that wait for both to serve failed; with 32, in 1 of
/// 2 billion.
const SHARDS: u32 = 32;

/// A grid for one test: nats-server plus coordinators and workers, in a temporary dir.
pub struct Grid {
    pub dir: tempfile::TempDir,
    pub nats_url: String,
    /// The address nats-server listens on (loopback unless the test asked otherwise).
    pub nats_listen: String,
    pub prefix: String,
    pub shards: u32,
    pub nats: Process,
    pub coordinators: Vec<Process>,
    pub workers: Vec<Process>,
    /// Variables every `flowgrid` process of the grid gets (a secured grid's credentials).
    pub env: Vec<(String, String)>,
    /// Credentials and TLS of the test's own connections.
    pub nats_options: flowgrid_sdk::NatsOptions,
}

impl Grid {
    /// Starts nats-server (JetStream, random port, temporary store dir).
    pub fn start_nats() -> Result<Grid> {
        Grid::start_nats_with_config("")
    }

    /// [`Grid::start_nats`] with more lines of nats-server configuration.
    pub fn start_nats_with_config(more: &str) -> Result<Grid> {
        Grid::start_nats_on("127.0.0.1", more)
    }

    /// [`Grid::start_nats_with_config`], listening on `listen` (`0.0.0.0` for processes in
    /// other network namespaces); clients of the grid still connect through loopback.
    pub fn start_nats_on(listen: &str, more: &str) -> Result<Grid> {
        let dir = tempfile::Builder::new().prefix("flowgrid-e2e-").tempdir()?;
        let port = free_port()?;
        // deploy/nats-server.conf gives room (`max_payload: 8MB`) for the tests that send
        // oversized requests and expect flowgrid, not NATS, to refuse them.
        write_nats_config(dir.path(), more)?;
        let nats = spawn_nats(dir.path(), listen, port)?;
        Ok(Grid {
            dir,
            nats_url: format!("nats://127.0.0.1:{port}"),
            nats_listen: listen.to_owned(),
            prefix: "flowgrid".to_owned(),
            shards: SHARDS,
            nats,
            coordinators: Vec::new(),
            workers: Vec::new(),
            env: Vec::new(),
            nats_options: flowgrid_sdk::NatsOptions::default(),
        })
    }

    /// Kills nats-server and starts it again on the same port and store dir: clients
    /// reconnect, and the streams keep what they held.
    pub fn restart_nats(&mut self, down_for: Duration) -> Result<()> {
        self.nats.kill_hard();
        std::thread::sleep(down_for);
        let port = self.nats_url.rsplit(':').next().and_then(|port| port.parse().ok()).context("the grid's port")?;
        self.nats = spawn_nats(self.dir.path(), &self.nats_listen, port)?;
        Ok(())
    }

    /// Kills nats-server, deletes its store (every stream and bucket of the grid) and
    /// starts it again on the same port: the grid's state in NATS is lost.
    pub fn restart_nats_empty(&mut self, down_for: Duration) -> Result<()> {
        self.nats.kill_hard();
        std::fs::remove_dir_all(self.dir.path().join("nats")).context("delete nats-server's store")?;
        self.restart_nats(down_for)
    }

    /// nats-server plus one coordinator and demo workers for `pools`.
    pub async fn start(pools: &[&str]) -> Result<Grid> {
        let mut grid = Grid::start_nats()?;
        grid.start_coordinator().await?;
        if !pools.is_empty() {
            grid.start_workers(pools, 32)?;
        }
        Ok(grid)
    }

    /// [`Grid::start`] with the coordinator serving Prometheus metrics; returns their
    /// address too.
    pub async fn start_with_metrics(pools: &[&str], concurrency: u32) -> Result<(Grid, String)> {
        let mut grid = Grid::start_nats()?;
        let metrics_addr = format!("127.0.0.1:{}", free_port()?);
        grid.spawn_coordinator_with_metrics(&metrics_addr)?;
        grid.wait_until_serving().await?;
        grid.start_workers(pools, concurrency)?;
        Ok((grid, metrics_addr))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts a coordinator on the grid's data dir and waits until it serves the API.
    pub async fn start_coordinator(&mut self) -> Result<()> {
        self.spawn_coordinator()?;
        self.wait_until_serving().await
    }

    /// Starts one more coordinator on the grid's data dir without waiting for it; returns
    /// its index in `coordinators`.
    pub fn spawn_coordinator(&mut self) -> Result<usize> {
        self.spawn_coordinator_with_metrics("off")
    }

    /// [`Grid::spawn_coordinator`], serving Prometheus metrics on `metrics_addr`.
    pub fn spawn_coordinator_with_metrics(&mut self, metrics_addr: &str) -> Result<usize> {
        self.spawn_coordinator_with_args(&["--metrics-addr", metrics_addr])
    }

    /// [`Grid::spawn_coordinator`] with more flags; metrics are off unless they name a
    /// `--metrics-addr` (a grid of `make up` may hold the default port).
    pub fn spawn_coordinator_with_args(&mut self, more: &[&str]) -> Result<usize> {
        let mut command = Command::new(flowgrid_bin());
        command.args(["--nats-url", &self.nats_url]);
        self.spawn_coordinator_command(command, more)
    }

    /// Starts one more coordinator inside the network namespace `netns`,
    /// reaching nats-server at `nats_url`; returns its index in `coordinators`.
    pub fn spawn_coordinator_in_netns(&mut self, netns: &Netns, nats_url: &str) -> Result<usize> {
        let mut command = netns.command(&flowgrid_bin());
        command.args(["--nats-url", nats_url]);
        self.spawn_coordinator_command(command, &[])
    }

    /// Runs `command` (the `flowgrid` binary and its NATS URL) as a coordinator of this grid.
    fn spawn_coordinator_command(&mut self, mut command: Command, more: &[&str]) -> Result<usize> {
        let name = format!("coordinator-{}", self.coordinators.len());
        command
            .args(["coordinator", "--prefix", &self.prefix])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--shards", &self.shards.to_string()])
            .args(more)
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .env("FLOWGRID_LOG", "flowgrid=debug,info");
        if !more.contains(&"--metrics-addr") {
            command.args(["--metrics-addr", "off"]);
        }
        let process = Process::spawn(&name, &mut command, self.dir.path())?;
        self.coordinators.push(process);
        Ok(self.coordinators.len() - 1)
    }

    /// The claim of every shard (`None`: never claimed), read from the shards bucket.
    pub async fn shard_claims(&self) -> Result<Vec<Option<ShardClaim>>> {
        let jetstream = async_nats::jetstream::new(self.nats_client().await?);
        let kv = jetstream.get_key_value(flowgrid_proto::Subjects::new(self.prefix.clone()).shards_bucket()).await?;
        let mut claims = Vec::new();
        for shard in 0..self.shards {
            let entry = kv.entry(flowgrid_proto::shard_key(shard)).await?;
            claims.push(match entry {
                Some(entry) if !entry.value.is_empty() => Some(rmp_serde::from_slice(&entry.value)?),
                _ => None,
            });
        }
        Ok(claims)
    }

    /// Waits until every shard is served and the serving owners are exactly `owners`
    /// distinct members; returns the owner of each shard.
    pub async fn wait_shards_served_by(&self, owners: usize, deadline: Duration) -> Result<Vec<String>> {
        let until = Instant::now() + deadline;
        loop {
            let claims = self.shard_claims().await.unwrap_or_default();
            let serving: Vec<String> = claims
                .iter()
                .filter_map(|claim| claim.as_ref().filter(|claim| claim.state == ShardState::Serving))
                .filter_map(|claim| claim.owner.clone())
                .collect();
            let mut distinct = serving.clone();
            distinct.sort();
            distinct.dedup();
            if serving.len() == self.shards as usize && distinct.len() == owners {
                return Ok(serving);
            }
            if Instant::now() > until {
                bail!("shards not served by {owners} coordinators within {deadline:?}: {claims:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a coordinator answers `flow.list`.
    pub async fn wait_until_serving(&self) -> Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(2), client.flows()).await;
            if let Ok(Ok(_)) = attempt {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs =
                    self.coordinators.iter().map(|c| format!("--- {}\n{}", c.name, c.log_tail(40))).collect::<Vec<_>>();
                bail!("no coordinator served within {STARTUP_DEADLINE:?}:\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts demo workers (`flowgrid worker`) for `pools`, without simulated delays.
    pub fn start_workers(&mut self, pools: &[&str], concurrency: u32) -> Result<()> {
        let name = format!("worker-{}", self.workers.len());
        let process = Process::spawn(
            &name,
            Command::new(flowgrid_bin())
                .arg("worker")
                .args(["--nats-url", &self.nats_url, "--prefix", &self.prefix])
                .args(["--pools", &pools.join(","), "--concurrency", &concurrency.to_string(), "--speed", "0"])
                .envs(self.env.iter().map(|(name, value)| (name, value))),
            self.dir.path(),
        )?;
        self.workers.push(process);
        Ok(())
    }

    pub async fn nats_client(&self) -> Result<async_nats::Client> {
        Ok(self.nats_options.connect(&self.nats_url, "flowgrid-test").await?)
    }

    pub async fn client(&self) -> Result<flowgrid_sdk::Client> {
        Ok(flowgrid_sdk::Client::new(self.nats_client().await?, self.prefix.clone()))
    }

    /// Adds a process that is not a demo worker (e.g. a worker in another language); its
    /// log goes with the grid's logs and it is killed with the grid.
    pub fn spawn_worker(&mut self, name: &str, command: &mut Command) -> Result<()> {
        let process = Process::spawn(name, command, self.dir.path())?;
        self.workers.push(process);
        Ok(())
    }

    /// Polls the run until it ends, or fails after `deadline` with the last view and the logs.
    pub async fn wait_run(&self, client: &flowgrid_sdk::Client, run_id: &RunId, deadline: Duration) -> Result<RunView> {
        let until = Instant::now() + deadline;
        loop {
            let last_seen = match client.get(run_id).await {
                Ok(view) if view.status.is_terminal() => return Ok(view),
                Ok(view) => format!("{view:?}"),
                Err(error) => format!("error: {error}"),
            };
            if Instant::now() > until {
                bail!("run {run_id} did not end within {deadline:?}; last seen: {last_seen}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `flowgrid ARGS` run against this grid: whether it succeeded, its stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        self.cli_with_env(&env, args)
    }

    /// [`Grid::cli`] with the variables `env` instead of the grid's own.
    pub fn cli_with_env(&self, env: &[(&str, &str)], args: &[&str]) -> Result<(bool, String, String)> {
        let output = Command::new(flowgrid_bin())
            .args(["--nats-url", &self.nats_url, "--prefix", &self.prefix])
            .args(args)
            .envs(env.iter().copied())
            .output()?;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Ok((output.status.success(), text(&output.stdout), text(&output.stderr)))
    }

    /// Logs of every process, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for process in self.coordinators.iter().chain(self.workers.iter()) {
            out.push_str(&format!("--- {} ---\n{}\n", process.name, process.log_tail(60)));
        }
        out.push_str(&format!("--- {} ---\n{}\n", self.nats.name, self.nats.log_tail(20)));
        out
    }
}

impl Drop for Grid {
    /// A test that panics (a failed assert) shows what the processes did. The processes
    /// are killed here, before the fields drop: `dir` drops first, and a process still
    /// running could write into it while it is being removed.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("grid logs at the failure:\n{}", self.logs());
        }
        for process in self.workers.iter_mut().chain(self.coordinators.iter_mut()) {
            process.kill_hard();
        }
        self.nats.kill_hard();
    }
}

/// A request of API verb `verb` (`run.get`) with `body` in JSON, as any client may send it,
/// and its reply; `timeout` bounds the wait.
pub async fn api_request_json(
    nats: &async_nats::Client,
    prefix: &str,
    verb: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<async_nats::Message, async_nats::RequestError> {
    let subject = flowgrid_proto::Subjects::new(prefix.to_owned()).api(verb);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(flowgrid_proto::CONTENT_TYPE_HEADER, flowgrid_proto::JSON_CONTENT_TYPE);
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(serde_json::to_vec(body).expect("JSON values encode").into())
        .timeout(Some(timeout));
    nats.send_request(subject, request).await
}

/// Polls `check` until it returns `Some`, or fails after `deadline` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The step `id` of `view`; panics with the view when the run has no such step.
pub fn step<'a>(view: &'a RunView, id: &str) -> &'a StepView {
    view.steps.iter().find(|step| step.id == id).unwrap_or_else(|| panic!("run has no step `{id}`: {view:?}"))
}

/// The repository root (the parent of `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The Python interpreter `make setup` prepared: `GRID_PYTHON` from the environment or from
/// `.grid/tools.env`, else `python3` from `PATH`.
pub fn python_bin() -> PathBuf {
    if let Ok(path) = std::env::var("GRID_PYTHON") {
        return PathBuf::from(path);
    }
    let tools = std::fs::read_to_string(repo_root().join(".grid/tools.env")).unwrap_or_default();
    let configured =
        tools.lines().find_map(|line| line.strip_prefix("GRID_PYTHON=")).map(|value| PathBuf::from(value.trim()));
    match configured {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("python3"),
    }
}
