//! `flowgrid run watch`: a run's steps as they start and end, until the run ends.
//!
//! Polls the run and prints what changed since the last look, in the order it happened: a
//! step that started, ended, went into a retry, or moved on with its items; a pause, a
//! resume, the run's end. Changes between two looks are coalesced into the latest state.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use flowgrid_engine::{RunStatus, RunView, StepStatus, StepView};
use flowgrid_model::RunId;
use flowgrid_sdk::Client;
use serde_json::json;

use crate::output::{duration_ms, item_counts, now_ms, outln, printable, span, utc_time};
use crate::Session;

/// How often the run is read.
const POLL: Duration = Duration::from_millis(250);

/// Prints the run's changes until it ends or `timeout` passes; exit 0 if it succeeded.
pub(super) async fn watch(
    client: &Client,
    run_id: &RunId,
    timeout: Duration,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    // A timeout past what the clock can count sets no deadline (the parser bounds it well
    // within).
    let deadline = Instant::now().checked_add(timeout);
    let mut last: Option<RunView> = None;
    // Read whole (the steps' progress reports are data) until the run is too large for
    // one message; from then on without its data, which the changes need but for progress.
    let mut whole = true;
    loop {
        let view = if whole {
            let (view, left_out) = client.get_or_without_data(run_id).await?;
            if let Some(refusal) = left_out {
                eprintln!(
                    "note: the run is too large to read whole ({}); its steps' progress reports are left out",
                    refusal.message
                );
                whole = false;
            }
            view
        } else {
            client.get_without_data(run_id).await?
        };
        for change in changes(last.as_ref(), &view) {
            if session.json {
                // One line per change, as `run tail --json` prints its pieces.
                let line = json!({"at_ms": change.at_ms, "subject": change.subject, "what": change.what});
                outln!("{}", serde_json::to_string(&line)?)?;
            } else {
                outln!("{}  {:<14} {}", clock(change.at_ms), change.subject, printable(&change.what))?;
            }
        }
        crate::output::stop_if_reader_gone();
        if view.status.is_terminal() {
            return Ok(if view.status == RunStatus::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            eprintln!("run {run_id} is still running after {}", duration_ms(timeout.as_millis() as u64));
            return Ok(ExitCode::FAILURE);
        }
        last = Some(view);
        tokio::time::sleep(POLL).await;
    }
}

/// One line of the watch: when, what it is about (the run or a step), what happened.
#[derive(Debug, PartialEq)]
struct Change {
    at_ms: u64,
    subject: String,
    what: String,
}

/// What changed from `before` (nothing seen yet: `None`) to `now`.
fn changes(before: Option<&RunView>, now: &RunView) -> Vec<Change> {
    let mut changes = Vec::new();
    let run = |at_ms: u64, what: String| Change { at_ms, subject: "run".to_owned(), what };
    let was_queued = before.and_then(|before| before.queued.as_ref());
    match (&now.queued, was_queued) {
        (Some(queued), None) => {
            changes.push(run(queued.since_ms, "queued: waiting for its turn under its flow's concurrency limit".into()))
        }
        (None, Some(queued)) if !now.status.is_terminal() => {
            // Admitted when the first step it held started (or, none started yet, now).
            let held = now.steps.iter().filter(|step| queued.held.contains(&step.id));
            let at_ms = held.filter_map(|step| step.started_ms).min().unwrap_or_else(now_ms);
            changes.push(run(at_ms, "admitted by its flow's limit".into()))
        }
        _ => {}
    }
    match before {
        None => changes.push(run(now.created_ms, format!("started ({}@{})", now.flow, now.version))),
        Some(before) => {
            if before.paused.is_none() {
                if let Some(paused) = &now.paused {
                    changes.push(run(paused.since_ms, format!("paused: {}", paused.reason)));
                }
            } else if now.paused.is_none() && !now.status.is_terminal() {
                changes.push(run(now_ms(), "resumed".to_owned()));
            }
        }
    }
    if let (Some(delayed), None) = (&now.delayed, before.and_then(|before| before.delayed.as_ref())) {
        changes.push(run(now.created_ms, format!("delayed: starts at {}", utc_time(delayed.until_ms))));
    }
    for step in &now.steps {
        let earlier = before.and_then(|before| before.steps.iter().find(|earlier| earlier.id == step.id));
        if let Some(change) = step_change(earlier, step) {
            changes.push(change);
        }
    }
    if now.status.is_terminal() {
        let ended_ms = now.ended_ms.unwrap_or_else(now_ms);
        let mut what = format!("{} in {}", now.status.as_str(), span(Some(now.created_ms), Some(ended_ms)));
        if let Some(error) = &now.error {
            what.push_str(&format!(": {}: {}", error.code, error.message));
        }
        changes.push(run(ended_ms, what));
    }
    // In the order they happened (a stable sort: the run's start and end stay first and last).
    changes.sort_by_key(|change| change.at_ms);
    changes
}

/// What changed for one step, if anything; a step never seen before counts from pending.
fn step_change(before: Option<&StepView>, now: &StepView) -> Option<Change> {
    let (status, attempts, items, progress) = match before {
        Some(before) => (before.status, before.attempts, before.items, before.progress.as_ref()),
        None => (StepStatus::Pending, 0, None, None),
    };
    let at_ms = match now.status {
        StepStatus::Running => now.started_ms,
        _ => now.ended_ms,
    };
    let at_ms = at_ms.unwrap_or_else(now_ms);
    let subject = now.id.clone();
    let what = match now.status {
        StepStatus::Running
            if now.status == status && now.attempts == attempts && now.progress.as_ref() != progress =>
        {
            return now.progress.as_ref().map(|progress| Change {
                at_ms: now_ms(),
                subject,
                what: format!("progress {progress}"),
            });
        }
        _ if now.status == status && now.attempts == attempts && now.items == items => return None,
        StepStatus::Pending => return None,
        StepStatus::Running => match (&now.items, now.iteration) {
            (Some(counts), _) => format!("running, items {}", item_counts(counts)),
            (None, Some(iteration)) => match &now.child_run {
                Some(child) => format!("running, iteration {iteration}: child run {child}"),
                None => format!("running, iteration {iteration}"),
            },
            (None, None) if now.attempts > 1 => format!("running, attempt {}", now.attempts),
            (None, None) => "running".to_owned(),
        },
        StepStatus::Retrying => match &now.error {
            Some(error) => format!("attempt {} failed ({}: {}); retrying", now.attempts, error.code, error.message),
            None => format!("attempt {} failed; retrying", now.attempts),
        },
        StepStatus::Succeeded => format!("succeeded in {}", span(now.started_ms, now.ended_ms)),
        StepStatus::Failed => {
            let error =
                now.error.as_ref().map(|error| format!(": {}: {}", error.code, error.message)).unwrap_or_default();
            let caught = if now.caught { " (caught)" } else { "" };
            format!("failed{caught}{error}")
        }
        StepStatus::Skipped => "skipped".to_owned(),
        StepStatus::Cancelled => "cancelled".to_owned(),
    };
    Some(Change { at_ms, subject, what })
}

/// `HH:MM:SS.mmm` (UTC) of a time in Unix milliseconds.
fn clock(ms: u64) -> String {
    let time = utc_time(ms);
    let time = time.split('T').nth(1).unwrap_or(&time).trim_end_matches('Z').to_owned();
    format!("{time}.{:03}", ms % 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgrid_engine::{ItemCounts, TaskError};

    fn step(id: &str, status: StepStatus, attempts: u32) -> StepView {
        StepView {
            id: id.into(),
            kind: "task".into(),
            status,
            attempts,
            cached: 0,
            started_ms: Some(1_010),
            ended_ms: None,
            output: None,
            error: None,
            progress: None,
            caught: false,
            items: None,
            child_run: None,
            child_round: 0,
            iteration: None,
        }
    }

    fn view(status: RunStatus, steps: Vec<StepView>) -> RunView {
        RunView {
            run_id: RunId("r".into()),
            flow: "f".into(),
            version: 2,
            status,
            input: serde_json::Value::Null,
            output: None,
            error: None,
            created_ms: 1_000,
            ended_ms: None,
            parent: None,
            redriven: None,
            paused: None,
            queued: None,
            delayed: None,
            on_failure_run: None,
            steps,
            labels: Default::default(),
            data_left_out: false,
        }
    }

    fn lines(changes: Vec<Change>) -> Vec<String> {
        changes.into_iter().map(|change| format!("{} {}", change.subject, change.what)).collect()
    }

    #[test]
    fn a_watch_tells_each_step_that_starts_retries_moves_on_and_ends() {
        let first = view(
            RunStatus::Running,
            vec![step("fetch", StepStatus::Running, 1), step("store", StepStatus::Pending, 0)],
        );
        assert_eq!(lines(changes(None, &first)), ["run started (f@2)", "fetch running"]);
        assert!(changes(Some(&first), &first).is_empty(), "nothing changed");

        let mut retrying = step("fetch", StepStatus::Retrying, 1);
        retrying.error = Some(TaskError { code: "busy".into(), message: "try later".into(), retryable: true });
        let second = view(RunStatus::Running, vec![retrying, step("store", StepStatus::Pending, 0)]);
        assert_eq!(lines(changes(Some(&first), &second)), ["fetch attempt 1 failed (busy: try later); retrying"]);
        let third = view(
            RunStatus::Running,
            vec![step("fetch", StepStatus::Running, 2), step("store", StepStatus::Pending, 0)],
        );
        assert_eq!(lines(changes(Some(&second), &third)), ["fetch running, attempt 2"]);
        let mut reported = third.clone();
        reported.steps[0].progress = Some(serde_json::json!({"done": 3}));
        assert_eq!(lines(changes(Some(&third), &reported)), ["fetch progress {\"done\":3}"]);
        assert!(changes(Some(&reported), &reported).is_empty(), "the same progress again is no change");

        let mut fetched = step("fetch", StepStatus::Succeeded, 2);
        fetched.ended_ms = Some(1_055);
        let mut store = step("store", StepStatus::Running, 0);
        store.kind = "map".into();
        store.started_ms = Some(1_055);
        store.items = Some(ItemCounts { total: 4, succeeded: 1, failed: 0, running: 2 });
        let fourth = view(RunStatus::Running, vec![fetched, store]);
        assert_eq!(lines(changes(Some(&third), &fourth)), ["fetch succeeded in 45ms", "store running, items 1/4"]);

        let mut done = fourth.clone();
        done.status = RunStatus::Succeeded;
        done.ended_ms = Some(1_200);
        done.steps[1].status = StepStatus::Succeeded;
        done.steps[1].items = Some(ItemCounts { total: 4, succeeded: 4, failed: 0, running: 0 });
        done.steps[1].ended_ms = Some(1_200);
        assert_eq!(lines(changes(Some(&fourth), &done)), ["store succeeded in 145ms", "run succeeded in 200ms"]);
    }

    #[test]
    fn a_watch_tells_each_iteration_of_a_loop() {
        let iteration = |number: u32| {
            let mut agent = step("agent", StepStatus::Running, number + 1);
            agent.kind = "subflow".into();
            agent.iteration = Some(number);
            agent.child_run = Some(RunId(format!("c{number}").into()));
            view(RunStatus::Running, vec![agent])
        };
        assert_eq!(
            lines(changes(None, &iteration(0))),
            ["run started (f@2)", "agent running, iteration 0: child run c0"]
        );
        assert!(changes(Some(&iteration(0)), &iteration(0)).is_empty(), "the same iteration is no change");
        assert_eq!(lines(changes(Some(&iteration(0)), &iteration(1))), ["agent running, iteration 1: child run c1"]);
    }

    #[test]
    fn a_watch_tells_a_pause_and_a_resume() {
        let going = view(RunStatus::Running, vec![step("fetch", StepStatus::Running, 1)]);
        let mut paused = going.clone();
        paused.paused = Some(flowgrid_engine::Paused { since_ms: 1_100, reason: "db".into(), held: vec![] });
        assert_eq!(lines(changes(Some(&going), &paused)), ["run paused: db"]);
        assert_eq!(lines(changes(Some(&paused), &going)), ["run resumed"]);
        assert_eq!(clock(1_796_481_597_825), "14:39:57.825");
    }

    #[test]
    fn a_watch_tells_a_queued_run_and_its_admission() {
        let mut queued = view(RunStatus::Running, vec![step("fetch", StepStatus::Pending, 0)]);
        queued.queued = Some(flowgrid_engine::Queued { since_ms: 1_000, held: vec!["fetch".into()] });
        let started = lines(changes(None, &queued));
        assert_eq!(
            started,
            ["run queued: waiting for its turn under its flow's concurrency limit", "run started (f@2)"]
        );
        let admitted = view(RunStatus::Running, vec![step("fetch", StepStatus::Running, 1)]);
        assert_eq!(lines(changes(Some(&queued), &admitted)), ["run admitted by its flow's limit", "fetch running"]);
        assert!(changes(Some(&admitted), &admitted).is_empty());

        let mut delayed = view(RunStatus::Running, vec![step("fetch", StepStatus::Pending, 0)]);
        delayed.delayed = Some(flowgrid_engine::Delayed { until_ms: 60_000, held: vec!["fetch".into()] });
        let started = lines(changes(None, &delayed));
        assert_eq!(started, ["run started (f@2)", "run delayed: starts at 1970-01-01T00:01:00Z"]);
        assert!(changes(Some(&delayed), &delayed).is_empty());
    }
}
