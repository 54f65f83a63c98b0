//! A disk that really fills up: the coordinator's data directory on a small tmpfs, filled
//! to the last byte by a file the test then deletes.
//! - Everything on the full disk: the journal fails, the coordinator refuses, stops with
//!   an error that says to free the disk, and once it is restarted no run it accepted is
//!   lost (ADR 0008).
//! - Only the shard files on the full disk (the journal elsewhere): runs go on from the
//!   journal while checkpoints fail, and once space is freed the checkpoints succeed again
//!   without a restart.
//! - A coordinator started on a full disk cannot create its shard files, and serves once
//!   space is freed, without a restart.
//! - A nats-server with less JetStream storage than the tasks stream's limit: the
//!   coordinator says so and how to fix it, and starts with a smaller limit.
//!
//! Mounting a tmpfs needs root (or CAP_SYS_ADMIN); without it the tests say SKIPPED and why.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flowgrid_sdk::{RunId, RunStatus, StartRun};
use flowgrid_tests::{wait_for, Grid};
use serde_json::json;

use crate::{deploy, wait_for_log, OrLogs, ECHO_FLOW, RUN_DEADLINE};

/// How long the coordinator may take to notice the full disk, or the freed one.
const NOTICE: Duration = Duration::from_secs(60);
/// The input of every run: large, so that a few commits need fresh pages of the disk.
const INPUT_BYTES: usize = 64 * 1024;

/// A tmpfs mounted on a directory for the life of the value, and a file that can take
/// every byte left on it.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB on `dir`; `None` (after saying why) where mounting is
    /// not allowed.
    fn mount(dir: &Path, mib: u32, test: &str) -> anyhow::Result<Option<SmallDisk>> {
        std::fs::create_dir_all(dir)?;
        let mounted =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(dir).output()?;
        if !mounted.status.success() {
            eprintln!(
                "SKIPPED: {test}: mounting a tmpfs to fill up needs root or CAP_SYS_ADMIN ({})",
                String::from_utf8_lossy(&mounted.stderr).trim()
            );
            return Ok(None);
        }
        Ok(Some(SmallDisk { dir: dir.to_path_buf() }))
    }

    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }

    /// Writes the filler until the disk is full.
    fn fill(&self) -> anyhow::Result<()> {
        let mut filler = std::fs::File::create(self.filler())?;
        let chunk = vec![1u8; 64 * 1024];
        loop {
            match filler.write_all(&chunk) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::StorageFull => break,
                Err(error) => return Err(error.into()),
            }
        }
        // Whatever a partial write left: the last bytes, one at a time.
        while filler.write_all(&[1]).is_ok() {}
        Ok(())
    }

    fn free(&self) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.filler())?)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: processes that still hold files on it may not have stopped yet.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn big_start() -> StartRun {
    StartRun {
        flow: "echo-once".into(),
        version: None,
        input: json!({ "blob": "x".repeat(INPUT_BYTES) }),
        idempotency_key: None,
        ..Default::default()
    }
}

/// Waits until coordinator `index` has exited; returns the last `lines` of its log.
async fn wait_stopped(grid: &mut Grid, index: usize, lines: usize) -> anyhow::Result<String> {
    wait_for("the coordinator to stop", NOTICE, || {
        let exited = grid.coordinators[index].has_exited();
        async move { exited.then_some(()) }
    })
    .await
    .or_logs(grid)?;
    Ok(grid.coordinators[index].log_tail(lines))
}

/// Waits until every run in `runs` has succeeded.
async fn wait_all_succeeded(grid: &Grid, client: &flowgrid_sdk::Client, runs: &[RunId]) -> anyhow::Result<()> {
    for run_id in runs {
        let view = grid.wait_run(client, run_id, RUN_DEADLINE).await?;
        anyhow::ensure!(view.status == RunStatus::Succeeded, "run {run_id}: {view:?}\n{}", grid.logs());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_coordinator_with_an_error_and_loses_no_accepted_run() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let test = "a_full_disk_stops_the_coordinator_with_an_error_and_loses_no_accepted_run";
    let Some(disk) = SmallDisk::mount(&grid.data_dir(), 48, test)? else { return Ok(()) };
    grid.start_coordinator().await?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;

    // Runs accepted while no worker runs: they wait for their task when the disk fills.
    let mut accepted = Vec::new();
    for _ in 0..10 {
        accepted.push(client.start(big_start()).await.or_logs(&grid)?.run_id);
    }
    disk.fill()?;

    // Starts are refused with an error, not left waiting; one that was still accepted
    // (a commit that fit in a page the journal already had) must not be lost either.
    let impatient = client.clone().with_retry_budget(Duration::ZERO);
    let refusal = loop {
        match tokio::time::timeout(RUN_DEADLINE, impatient.start(big_start())).await {
            Ok(Ok(run)) => accepted.push(run.run_id),
            Ok(Err(error)) => break error,
            Err(_) => anyhow::bail!("a start on a full disk was neither accepted nor refused\n{}", grid.logs()),
        }
        anyhow::ensure!(accepted.len() < 100, "100 starts passed on a full disk\n{}", grid.logs());
    };
    let refusal = crate::refusal(&refusal);
    assert!(refusal.retryable, "a full disk is worth retrying once it is freed: {refusal:?}");

    // The coordinator leaves the grid, and says why and what to do.
    let log = wait_stopped(&mut grid, 0, 20).await?;
    assert!(log.contains("No space left on device") && log.contains("Free or fix the data directory's disk"), "{log}");

    // Freed and restarted, it has every run it accepted, and they all run to the end.
    disk.free()?;
    grid.start_coordinator().await?;
    grid.start_workers(&["a"], 8)?;
    wait_all_succeeded(&grid, &client, &accepted).await?;
    let after = client.start(big_start()).await.or_logs(&grid)?;
    wait_all_succeeded(&grid, &client, &[after.run_id]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_files_on_a_full_disk_recover_without_a_restart_once_space_is_freed() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let test = "shard_files_on_a_full_disk_recover_without_a_restart_once_space_is_freed";
    let Some(disk) = SmallDisk::mount(&grid.data_dir(), 16, test)? else { return Ok(()) };
    // The journal on the roomy disk of the test's directory.
    let journal = grid.dir.path().join("journal");
    std::fs::create_dir_all(&journal)?;
    std::os::unix::fs::symlink(&journal, grid.data_dir().join("journal"))?;
    grid.start_coordinator().await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    disk.fill()?;

    // Runs go on, from memory and the journal, while their checkpoints fail.
    let mut done = Vec::new();
    for _ in 0..20 {
        done.push(client.start(big_start()).await.or_logs(&grid)?.run_id);
    }
    wait_all_succeeded(&grid, &client, &done).await?;
    wait_for_log(
        &grid,
        0,
        &["a checkpoint into the shard file failed", "No space left on device"],
        "a checkpoint to fail on the full disk",
    )
    .await?;

    // Freed, the shard files are opened again (redb fails every access to a file after a
    // failed write) and written, with no restart.
    disk.free()?;
    wait_for_log(
        &grid,
        0,
        &["opened the shard file again after a failed read or write", "checkpoints of the shard succeed again"],
        "the checkpoints to succeed again",
    )
    .await?;
    assert!(!grid.coordinators[0].has_exited(), "the coordinator kept running\n{}", grid.logs());
    let after = client.start(big_start()).await.or_logs(&grid)?;
    done.push(after.run_id);
    wait_all_succeeded(&grid, &client, &done).await?;

    // And nothing is lost across a restart.
    assert!(grid.coordinators[0].stop(NOTICE), "a clean stop\n{}", grid.logs());
    grid.start_coordinator().await?;
    wait_all_succeeded(&grid, &client, &done).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_started_on_a_full_disk_serves_once_space_is_freed() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats()?;
    let test = "a_coordinator_started_on_a_full_disk_serves_once_space_is_freed";
    let Some(disk) = SmallDisk::mount(&grid.data_dir(), 8, test)? else { return Ok(()) };
    disk.fill()?;
    grid.spawn_coordinator()?;
    wait_for_log(&grid, 0, &["cannot open the shard", "No space left on device"], "a shard to fail to open").await?;

    // The shard files it began to create hold only zeros; they are created again.
    disk.free()?;
    grid.wait_shards_served_by(1, NOTICE).await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let run = client.start(big_start()).await.or_logs(&grid)?;
    wait_all_succeeded(&grid, &client, &[run.run_id]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_with_little_jetstream_storage_is_named_and_a_smaller_tasks_stream_fits() -> anyhow::Result<()> {
    let mut grid = Grid::start_nats_with_config("jetstream { max_file_store: 64MB }")?;
    grid.spawn_coordinator()?;
    let log = wait_stopped(&mut grid, 0, 5).await?;
    assert!(log.contains("less JetStream storage left than the stream's limit of 1024 MiB"), "{log}");
    assert!(log.contains("--tasks-stream-max-mb"), "{log}");

    grid.spawn_coordinator_with_args(&["--metrics-addr", "off", "--tasks-stream-max-mb", "32"])?;
    grid.wait_until_serving().await?;
    grid.start_workers(&["a"], 8)?;
    let client = grid.client().await?;
    deploy(&grid, &client, ECHO_FLOW).await?;
    let run = client.start(big_start()).await.or_logs(&grid)?;
    wait_all_succeeded(&grid, &client, &[run.run_id]).await?;

    // The task cache's bucket (1 GiB by default) does not fit either: a step with `cache`
    // goes to its worker as if it had none, and the log says why.
    let cached = ECHO_FLOW.replace("name: echo-once", "name: echo-cached") + "    cache: { ttl_ms: 60000 }\n";
    deploy(&grid, &client, &cached).await?;
    for _ in 0..2 {
        let start = StartRun { flow: "echo-cached".into(), input: json!({"n": 1}), ..Default::default() };
        let run = client.start(start).await.or_logs(&grid)?;
        let view = grid.wait_run(&client, &run.run_id, RUN_DEADLINE).await?;
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}\n{}", grid.logs());
        assert_eq!(view.steps[0].cached, 0, "{view:?}");
    }
    let logs = grid.logs();
    assert!(logs.contains("cannot open the task cache") && logs.contains("--task-cache-max-mb"), "{logs}");
    Ok(())
}
