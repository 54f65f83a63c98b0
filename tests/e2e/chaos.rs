//! Short chaos run: the load-test harness's `chaos` command (three coordinators sharing one
//! grid under steady load, killed with SIGKILL, paused past their lease, a fourth added and
//! asked to leave) for 45 s. No accepted run may be lost, no result applied twice, no
//! commit made under a stale epoch.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowgrid_tests::flowgrid_bin;
use serde_json::Value;

/// The harness's own bound: 45 s of faults, up to 20 s of drain, a few seconds each to
/// start and stop the grid.
const HARNESS_DEADLINE: Duration = Duration::from_secs(110);

#[test]
fn coordinators_killed_paused_and_scaled_under_load_lose_no_run() {
    let flowgrid = flowgrid_bin();
    let harness = flowgrid.with_file_name("flowgrid-loadtest");
    assert!(harness.exists(), "{} is missing: run `cargo build --bins` first (make test does)", harness.display());
    let mut child = Command::new(&harness)
        .args(["chaos", "--duration", "45s", "--seed", "42", "--rate", "20", "--drain", "20s"])
        .arg("--flowgrid-bin")
        .arg(&flowgrid)
        .env_remove("FLOWGRID_LT_KEEP_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start flowgrid-loadtest chaos");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let started = Instant::now();
    let mut interrupted = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the harness") {
            break status;
        }
        if started.elapsed() > HARNESS_DEADLINE && !interrupted {
            // Ctrl-c lets the harness stop every process it started.
            let _ = Command::new("kill").arg("-INT").arg(child.id().to_string()).status();
            interrupted = true;
        }
        if started.elapsed() > HARNESS_DEADLINE + Duration::from_secs(15) {
            let _ = child.kill();
            break child.wait().expect("wait for the killed harness");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let output = format!("exit status: {status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(!interrupted, "the chaos run took over {HARNESS_DEADLINE:?}\n{output}");

    let line =
        stdout.lines().rev().find(|line| line.starts_with('{')).unwrap_or_else(|| panic!("no JSON line\n{output}"));
    let summary: Value = serde_json::from_str(line).unwrap_or_else(|error| panic!("bad JSON line: {error}\n{output}"));
    let count = |key: &str| summary[key].as_u64().unwrap_or_else(|| panic!("{key} is not a count in {line}\n{output}"));
    assert!(count("runs_accepted") > 0, "no run was accepted\n{output}");
    assert_eq!(count("runs_lost"), 0, "accepted runs were lost\n{output}");
    assert_eq!(count("results_double_applied"), 0, "results were applied twice\n{output}");
    assert_eq!(count("stale_epoch_commits"), 0, "commits under a stale epoch\n{output}");
    assert!(count("kills") >= 2, "fewer than 2 kills in 45 s\n{output}");
    assert!(status.success(), "the harness failed\n{output}");
    eprintln!("{line}");
}
