//! The grid under test: started here (nats-server on a random port with a temporary store
//! dir, and one coordinator from the release binary) or a running one given by URL.
//!
//! Every process started here is killed when its handle drops, which also happens on
//! ctrl-c (the main task returns) and on a panic (unwinding drops the handles).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowgrid_testkit::{free_port, nats_server_bin, wait_for_port, Process};

use crate::args::GridArgs;

/// How long nats-server or the coordinator may take to come up.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// The grid a command measures.
pub struct Grid {
    pub nats_url: String,
    pub prefix: String,
    coordinator_pid: Option<u32>,
    // Dropped in field order: the coordinator stops before nats-server, then the directory goes.
    coordinator: Option<Process>,
    nats: Option<Process>,
    _dir: Option<tempfile::TempDir>,
}

impl Grid {
    /// Connects to the grid at `--nats-url`, or starts one.
    pub async fn open(args: &GridArgs, extra_coordinator_args: &[String]) -> Result<Grid> {
        match &args.nats_url {
            Some(url) => Ok(Grid {
                nats_url: url.clone(),
                prefix: args.prefix.clone(),
                coordinator_pid: args.coordinator_pid,
                coordinator: None,
                nats: None,
                _dir: None,
            }),
            None => Grid::start(args, extra_coordinator_args).await,
        }
    }

    async fn start(args: &GridArgs, extra_coordinator_args: &[String]) -> Result<Grid> {
        let (dir, path) = match &args.keep_dir {
            Some(path) => {
                std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
                (None, path.clone())
            }
            None => {
                let dir = tempfile::Builder::new().prefix("flowgrid-loadtest-").tempdir()?;
                let path = dir.path().to_path_buf();
                (Some(dir), path)
            }
        };
        let flowgrid = flowgrid_bin(args)?;
        let nats_port = free_port()?;
        let mut nats = Process::spawn(
            "nats-server",
            Command::new(nats_server_bin())
                .args(["-js", "-a", "127.0.0.1", "-p", &nats_port.to_string(), "-sd"])
                .arg(path.join("nats")),
            &path,
        )
        .context("start nats-server: install it with `make setup` or set NATS_SERVER_BIN")?
        .with_drop_grace(Duration::from_secs(5));
        wait_for_port(nats_port, &mut nats, STARTUP_DEADLINE)?;
        let nats_url = format!("nats://127.0.0.1:{nats_port}");

        let mut command = Command::new(&flowgrid);
        command
            .arg("coordinator")
            .args(["--nats-url", &nats_url, "--prefix", &args.prefix])
            .arg("--data-dir")
            .arg(path.join("data"))
            .args(["--shards", &args.shards.to_string(), "--metrics-addr", "off"])
            .args(args.coordinator_args.split_whitespace())
            .args(extra_coordinator_args)
            .env("FLOWGRID_LOG", std::env::var("FLOWGRID_LOG").unwrap_or_else(|_| "warn".to_owned()));
        let coordinator = Process::spawn("coordinator", &mut command, &path)?.with_drop_grace(Duration::from_secs(5));
        let mut grid = Grid {
            nats_url,
            prefix: args.prefix.clone(),
            coordinator_pid: Some(coordinator.pid()),
            coordinator: Some(coordinator),
            nats: Some(nats),
            _dir: dir,
        };
        grid.wait_until_serving().await?;
        eprintln!(
            "grid: nats-server {} and coordinator pid {} ({}), logs in {}",
            grid.nats_url,
            grid.coordinator_pid.unwrap_or(0),
            flowgrid.display(),
            path.display()
        );
        Ok(grid)
    }

    /// The coordinator's resident set, in MiB, when its pid is known.
    pub fn coordinator_rss_mb(&self) -> Option<f64> {
        self.coordinator_pid.and_then(rss_kb).map(|kb| kb as f64 / 1024.0)
    }

    pub async fn connect(&self, name: &str) -> Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .name(name)
            .connect(&self.nats_url)
            .await
            .with_context(|| format!("connect to NATS at {}", self.nats_url))
    }

    pub async fn client(&self) -> Result<flowgrid_sdk::Client> {
        let nats = self.connect("flowgrid-loadtest-client").await?;
        Ok(flowgrid_sdk::Client::new(nats, self.prefix.clone()))
    }

    /// Stops the coordinator now (before the workers of the harness go away).
    pub fn stop(&mut self) {
        if let Some(mut coordinator) = self.coordinator.take() {
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
                return Ok(());
            }
            let exited = self.coordinator.as_mut().is_some_and(Process::has_exited);
            if exited || Instant::now() > deadline {
                let tail = self.coordinator.as_ref().map(|c| c.log_tail(40)).unwrap_or_default();
                bail!(
                    "the coordinator did not serve (exited or {STARTUP_DEADLINE:?} passed); its log ends with:\n{tail}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `--flowgrid-bin`, else `flowgrid` next to this binary (both live in target/release).
fn flowgrid_bin(args: &GridArgs) -> Result<PathBuf> {
    if let Some(path) = &args.flowgrid_bin {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().context("locate the flowgrid-loadtest binary")?;
    let bin = exe.with_file_name("flowgrid");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release --bins -p flowgrid-cli` (make loadtest does) \
             or pass --flowgrid-bin",
            bin.display()
        );
    }
    Ok(bin)
}
