//! `run --profile DIR`: samples the coordinators with `perf` while the run is measured,
//! then writes a flame graph and prints where their CPU went.
//!
//! `perf record` samples the coordinator processes (not the rest of the host) on the
//! `cpu-clock` event at [`SAMPLE_HZ`] with DWARF call graphs, which need no frame pointers
//! in the release build. The samples are folded with inferno into one line per distinct
//! stack (the root frame is the thread's name), each weighted by the CPU time it stands
//! for, and drawn as an SVG. Recording costs the host some CPU itself, so a
//! profiled run's throughput is a little lower than an unprofiled one's.

use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use inferno::collapse::perf::{Folder, Options as FoldOptions};
use inferno::collapse::Collapse;
use inferno::flamegraph::{self, Options as GraphOptions};

/// Samples per second and thread: enough for a few thousand samples in a few seconds
/// without perf itself taking a large share of the two cores.
const SAMPLE_HZ: u32 = 499;
/// Stack bytes copied per sample for unwinding: deep enough for tokio and redb stacks.
const STACK_BYTES: u32 = 16_384;
/// Lines of the printed summary per section.
const TOP_LINES: usize = 12;

/// The `perf` command: `$PERF`, else `perf` on the PATH.
fn perf() -> String {
    std::env::var("PERF").unwrap_or_else(|_| "perf".to_owned())
}

/// Fails early, before any load, when `perf` cannot run here.
pub fn check() -> Result<()> {
    let perf = perf();
    let output = Command::new(&perf).arg("--version").output().with_context(|| {
        format!("--profile needs `{perf}` (Debian: apt-get install linux-perf; or set PERF to its path)")
    })?;
    if !output.status.success() {
        bail!("`{perf} --version` failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// A `perf record` running over the coordinators; dropping it stops the recording.
pub struct Recording {
    /// `None` once `finish` took it.
    child: Option<std::process::Child>,
    dir: PathBuf,
    data: PathBuf,
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts sampling `pids` for `length`, writing into `dir`.
pub fn start(dir: &Path, pids: &[u32], length: Duration) -> Result<Recording> {
    if pids.is_empty() {
        bail!("--profile needs the coordinators' pids: let the harness start the grid, or pass --coordinator-pid");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create the profile directory {}", dir.display()))?;
    let data = dir.join("coordinator.perf.data");
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let child = Command::new(perf())
        .args(["record", "--quiet", "-e", "cpu-clock", "-F", &SAMPLE_HZ.to_string()])
        .args(["--call-graph", &format!("dwarf,{STACK_BYTES}")])
        .args(["-p", &pids.join(",")])
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep", &format!("{:.3}", length.as_secs_f64())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start perf record")?;
    Ok(Recording { child: Some(child), dir: dir.to_owned(), data })
}

/// What a recording found.
#[derive(Debug)]
pub struct Profile {
    pub flamegraph: PathBuf,
    pub folded: PathBuf,
    /// The coordinators' CPU time the samples stand for.
    pub cpu: Duration,
    /// Share of the CPU time by thread name, largest first.
    pub threads: Vec<(String, f64)>,
    /// Share of the CPU time with a function of the grid's own crates on the stack.
    pub own_functions: Vec<(String, f64)>,
    /// Share of the CPU time by the function that was running (the leaf), largest first.
    pub leaves: Vec<(String, f64)>,
}

impl Recording {
    /// Waits for the recording to end, then folds it and draws the flame graph (blocking:
    /// `perf script` takes seconds).
    pub fn finish(mut self) -> Result<Profile> {
        let (dir, data) = (self.dir.clone(), self.data.clone());
        let child = self.child.take().context("the recording was already finished")?;
        let output = child.wait_with_output().context("wait for perf record")?;
        if !output.status.success() {
            bail!("perf record failed: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        let mut script = Command::new(perf())
            .args(["script", "--no-inline", "-i"])
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start perf script")?;
        let stdout = script.stdout.take().context("perf script has no output")?;
        let mut folded = Vec::new();
        Folder::from(FoldOptions::default())
            .collapse(BufReader::new(stdout), &mut folded)
            .context("fold perf script's stacks")?;
        let status = script.wait().context("wait for perf script")?;
        if !status.success() || folded.is_empty() {
            bail!(
                "perf script found no samples of the coordinators in {} (status {status}; its messages are above); \
                 check that perf can sample them (kernel.perf_event_paranoid) and that --profile-duration is not too short",
                data.display()
            );
        }
        let folded_path = dir.join("coordinator.folded");
        std::fs::write(&folded_path, &folded).with_context(|| format!("write {}", folded_path.display()))?;
        let folded = String::from_utf8_lossy(&folded);
        let flamegraph = dir.join("coordinator.svg");
        let mut options = GraphOptions::default();
        options.title = "flowgrid coordinator".to_owned();
        let svg = std::fs::File::create(&flamegraph).with_context(|| format!("create {}", flamegraph.display()))?;
        flamegraph::from_lines(&mut options, folded.lines(), std::io::BufWriter::new(svg))
            .context("draw the flame graph")?;
        let shares = Shares::of(&folded);
        Ok(Profile {
            flamegraph,
            folded: folded_path,
            cpu: Duration::from_nanos(shares.total),
            threads: shares.top(&shares.roots, usize::MAX),
            own_functions: shares.top(&shares.own, TOP_LINES),
            leaves: shares.top(&shares.leaves, TOP_LINES),
        })
    }
}

impl Profile {
    pub fn print(&self) {
        println!(
            "coordinator profile: {:.2} s of CPU sampled; flame graph {}, folded stacks {}",
            self.cpu.as_secs_f64(),
            self.flamegraph.display(),
            self.folded.display()
        );
        let section = |title: &str, rows: &[(String, f64)]| {
            println!("{title}");
            for (name, share) in rows {
                println!("  {:>5.1}%  {name}", share * 100.0);
            }
        };
        section("by thread", &self.threads);
        section("the grid's functions, with what they call", &self.own_functions);
        section("running when sampled", &self.leaves);
    }
}

/// Weights (nanoseconds of CPU) of a folded profile, by thread, by own function
/// (inclusive) and by leaf.
#[derive(Debug, Default)]
struct Shares {
    total: u64,
    roots: HashMap<String, u64>,
    own: HashMap<String, u64>,
    leaves: HashMap<String, u64>,
}

/// Prefix of the functions of the grid's own crates.
const OWN_PREFIX: &str = "flowgrid_";

impl Shares {
    /// Reads lines of `thread;outer;...;leaf weight`.
    fn of(folded: &str) -> Shares {
        let mut shares = Shares::default();
        for line in folded.lines() {
            let Some((stack, count)) = line.rsplit_once(' ') else { continue };
            let Ok(count) = count.parse::<u64>() else { continue };
            let frames: Vec<&str> = stack.split(';').collect();
            shares.total += count;
            *shares.roots.entry(frames[0].to_owned()).or_default() += count;
            if let Some(leaf) = frames.last() {
                *shares.leaves.entry((*leaf).to_owned()).or_default() += count;
            }
            let own: HashSet<String> =
                frames.iter().filter(|frame| frame.starts_with(OWN_PREFIX)).map(|frame| function_name(frame)).collect();
            for function in own {
                *shares.own.entry(function).or_default() += count;
            }
        }
        shares
    }

    /// The `limit` largest weights, as shares of the total.
    fn top(&self, counts: &HashMap<String, u64>, limit: usize) -> Vec<(String, f64)> {
        let mut rows: Vec<(String, f64)> =
            counts.iter().map(|(name, count)| (name.clone(), *count as f64 / self.total.max(1) as f64)).collect();
        rows.sort_by(|left, right| right.1.total_cmp(&left.1).then_with(|| left.0.cmp(&right.0)));
        rows.truncate(limit);
        rows
    }
}

/// A frame without generic arguments and closure markers, so that one function's
/// instantiations and closures count together.
fn function_name(frame: &str) -> String {
    let mut name = String::with_capacity(frame.len());
    let mut depth = 0usize;
    for character in frame.chars() {
        match character {
            '<' => depth += 1,
            '>' => depth = depth.saturating_sub(1),
            _ if depth == 0 => name.push(character),
            _ => {}
        }
    }
    // `a::<impl T>::f` leaves `a::::f`.
    name.replace("::{{closure}}", "").replace("::{closure}", "").replace("::::", "::")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLDED: &str = "\
tokio-rt-worker;start_thread;flowgrid_coordinator::shard::actor::ShardActor<S>::run::{{closure}};flowgrid_coordinator::shard::runs::<impl flowgrid_coordinator::shard::actor::ShardActor<S>>::apply_event;malloc 3
tokio-rt-worker;start_thread;flowgrid_coordinator::shard::actor::ShardActor<S>::run::{{closure}};memcpy 1
flowgrid-checkp;start_thread;flowgrid_store_redb::checkpointer;redb::insert 4
not a folded line
";

    #[test]
    fn shares_count_threads_own_functions_and_leaves() {
        let shares = Shares::of(FOLDED);
        assert_eq!(shares.total, 8);
        let threads = shares.top(&shares.roots, usize::MAX);
        assert_eq!(threads, vec![("flowgrid-checkp".to_owned(), 0.5), ("tokio-rt-worker".to_owned(), 0.5)]);
        let own = shares.top(&shares.own, 2);
        assert_eq!(
            own,
            vec![
                ("flowgrid_coordinator::shard::actor::ShardActor::run".to_owned(), 0.5),
                ("flowgrid_store_redb::checkpointer".to_owned(), 0.5),
            ]
        );
        assert_eq!(shares.own.get("flowgrid_coordinator::shard::runs::apply_event"), Some(&3));
        let leaves = shares.top(&shares.leaves, 1);
        assert_eq!(leaves, vec![("redb::insert".to_owned(), 0.5)]);
        assert_eq!(shares.leaves.get("malloc"), Some(&3));
    }

    #[test]
    fn function_names_drop_generics_and_closures() {
        assert_eq!(
            function_name("flowgrid_coordinator::shard::actor::ShardActor<S>::run::{{closure}}"),
            "flowgrid_coordinator::shard::actor::ShardActor::run"
        );
        assert_eq!(
            function_name("flowgrid_coordinator::shard::runs::<impl flowgrid_coordinator::shard::actor::ShardActor<S>>::apply_event"),
            "flowgrid_coordinator::shard::runs::apply_event"
        );
    }
}
