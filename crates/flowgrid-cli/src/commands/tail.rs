//! `flowgrid run tail`: a run's live output (what its workers `emit` while their attempts
//! run), from the first piece the grid keeps, until the run ends.
//!
//! Texts are written out as they are, so a model's tokens read as its answer; any other
//! value goes on a line of its own. A line on stderr names the step, item and attempt each
//! time the output comes from another one, so that stdout holds only the output. With
//! `--json`, one JSON line per piece.

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flowgrid_engine::{RunStatus, RunView};
use flowgrid_model::{AttemptId, RunId};
use flowgrid_sdk::{Client, LiveOutput};
use futures::StreamExt;
use serde_json::json;

use crate::output::{duration_ms, out, outln};
use crate::Session;

/// How often the run is read to know whether it ended.
const POLL: Duration = Duration::from_millis(250);
/// After the run ended, how long to wait for pieces still on their way.
const DRAIN: Duration = Duration::from_millis(500);

/// Prints the run's live output until it ends (and its last pieces came) or `timeout`
/// passes; exit 0 if it succeeded.
pub(super) async fn tail(
    client: &Client,
    run_id: &RunId,
    step: Option<&str>,
    timeout: Duration,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    // Its steps and status: the run's data (as large as NATS carries) is not needed.
    let view = client.get_without_data(run_id).await?;
    if let Some(step) = step {
        if !view.steps.iter().any(|view| view.id == step) {
            let steps: Vec<&str> = view.steps.iter().map(|view| view.id.as_str()).collect();
            anyhow::bail!("run {run_id} has no step {step:?}; its steps: {}", steps.join(", "));
        }
    }
    let mut printer = Printer { json: session.json, last: None, ended_with_text: false };
    let ended = follow(client, &view, step, timeout, |piece| {
        let printed = printer.print(piece);
        crate::output::stop_if_reader_gone();
        std::future::ready(printed)
    })
    .await?;
    printer.finish()?;
    match ended {
        Some(status) => {
            if !session.json {
                eprintln!("run {run_id} {}", status.as_str());
            }
            Ok(if status == RunStatus::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        None => {
            eprintln!("run {run_id} is still running after {}", duration_ms(timeout.as_millis() as u64));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Hands each piece of the live output of the run `view` shows (as it was just read) to
/// `each` (and waits for it), from the first the grid keeps, until the run ended and its
/// last pieces came, `timeout` passed (then `None`) or `each` failed (a reader that went
/// away). Returns how the run ended.
pub(crate) async fn follow<F: Future<Output = anyhow::Result<()>>>(
    client: &Client,
    view: &RunView,
    step: Option<&str>,
    timeout: Duration,
    mut each: impl FnMut(LiveOutput) -> F,
) -> anyhow::Result<Option<RunStatus>> {
    let run_id = &view.run_id;
    let mut pieces = client.tail(run_id, step).await?;
    // A timeout past what the clock can count sets no deadline (the parser bounds it well
    // within).
    let deadline = Instant::now().checked_add(timeout);
    let mut ended: Option<(RunStatus, Instant)> = view.status.is_terminal().then(|| (view.status, Instant::now()));
    let mut poll = tokio::time::interval(POLL);
    loop {
        // The timeout holds after the end too: output that keeps coming (a redrive's new
        // attempt, a worker that missed its cancel) does not hold the tail past it.
        let stop_at = ended.map(|(_, at)| at + DRAIN).into_iter().chain(deadline).min();
        tokio::select! {
            piece = pieces.next() => match piece {
                Some(Ok(piece)) => {
                    each(piece).await?;
                    if let Some((status, _)) = ended {
                        ended = Some((status, Instant::now()));
                    }
                }
                Some(Err(error)) => eprintln!("skipped a piece of live output of run {run_id}: {error}"),
                None => break,
            },
            _ = poll.tick(), if ended.is_none() => {
                let view = client.get_without_data(run_id).await?;
                if view.status.is_terminal() {
                    ended = Some((view.status, Instant::now()));
                }
            }
            () = sleep_until(stop_at) => break,
        }
    }
    Ok(ended.map(|(status, _)| status))
}

/// Sleeps until `at`; with no time, for ever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A piece as `run tail --json` prints it and the HTTP API sends it: its step, item and
/// attempt, its number and its data.
pub(crate) fn piece_json(piece: &LiveOutput) -> serde_json::Value {
    let attempt = &piece.attempt;
    json!({"step": attempt.step, "item": attempt.item, "attempt": attempt.attempt, "seq": piece.seq, "data": piece.data})
}

/// Writes pieces out, and says on stderr whose they are when that changes.
struct Printer {
    json: bool,
    /// The step, item and attempt of the last piece printed.
    last: Option<AttemptId>,
    /// The last piece was a text that did not end its line.
    ended_with_text: bool,
}

impl Printer {
    fn print(&mut self, piece: LiveOutput) -> anyhow::Result<()> {
        if self.json {
            // One line per piece (JSON lines), for a reader that acts on each as it comes.
            return outln!("{}", serde_json::to_string(&piece_json(&piece))?);
        }
        if self.last.as_ref() != Some(&piece.attempt) {
            self.finish()?;
            let attempt = &piece.attempt;
            let item = attempt.item.map(|item| format!(" item {item}")).unwrap_or_default();
            eprintln!("── {}{item}, attempt {} ──", attempt.step, attempt.attempt);
            self.last = Some(piece.attempt.clone());
        }
        if !piece.data.is_string() {
            self.finish()?;
        }
        let text = piece.text();
        self.ended_with_text = !text.ends_with('\n');
        out!("{text}")
    }

    /// Ends a text's line, so what comes next starts on its own.
    fn finish(&mut self) -> anyhow::Result<()> {
        if std::mem::take(&mut self.ended_with_text) {
            outln!()?;
        }
        Ok(())
    }
}
