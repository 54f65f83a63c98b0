//! `flowgrid run start | get | list | signal | cancel | redrive | pause | resume | submit`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use flowgrid_engine::{RunStatus, RunView, StepStatus, StepView};
use flowgrid_model::{RunId, Step};
use flowgrid_proto::{ListRuns, RunRedriven, StartRun};
use flowgrid_sdk::{Client, ErrorCode};

use super::grid::pool_backlogs;
use super::many::{for_each_run, matching_runs, Verb};
use crate::args::{signal_target, RunCommand, RunInput, RunSelection, SignalTarget, TaskCommand};
use crate::failure::Applied;
use crate::grid_view::no_worker_hint;
use crate::output::{
    self, duration_ms, item_counts, now_ms, out, outln, print_json, printable, shell_word, span, utc_time, PagedTable,
    Table,
};
use crate::Session;

pub(crate) async fn dispatch(command: RunCommand, client: &Client, session: &Session) -> anyhow::Result<ExitCode> {
    match command {
        RunCommand::Start { flow, version, input, wait, timeout } => {
            let start = start_request(flow, version, input)?;
            let started = client.start(start).await?;
            if !wait {
                if session.json {
                    print_json(&started)?;
                } else {
                    outln!("{}", started.run_id)?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "started run {} of {}@{}; waiting up to {}",
                started.run_id,
                started.flow,
                started.version,
                duration_ms(timeout.as_millis() as u64)
            );
            wait_and_print(client, Applied::Started(started.run_id), timeout, session).await
        }
        RunCommand::Get { run_id } => {
            let run_id = RunId(run_id.into());
            let view = get_run(client, &run_id).await?;
            print_run(&view, session)?;
            hint_waiting_steps(client, &view, session).await;
            hint_refused_handler(client, &view, session).await;
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::History { run_id, after, limit } => {
            history(client, &RunId(run_id.into()), after, limit, session).await
        }
        RunCommand::Watch { run_id, timeout } => {
            super::watch::watch(client, &RunId(run_id.into()), timeout, session).await
        }
        RunCommand::Tail { run_id, step, timeout } => {
            super::tail::tail(client, &RunId(run_id.into()), step.as_deref(), timeout, session).await
        }
        RunCommand::List { flow, status, parent, filter, limit, cursor } => {
            let parent = parent.map(|parent| RunId(parent.into()));
            let list = client.list(ListRuns { parent, flow, status, limit, cursor, ..filter.query()? }).await?;
            if session.json {
                print_json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = Table::new(&["RUN ID", "FLOW", "STATUS", "CREATED", "DURATION"]);
            for run in &list.runs {
                table.row(vec![
                    run.run_id.to_string(),
                    format!("{}@{}", run.flow, run.version),
                    match (run.paused, run.queued, run.delayed) {
                        (true, _, _) => "running (paused)".to_owned(),
                        (false, true, _) => "running (queued)".to_owned(),
                        (false, false, true) => "running (delayed)".to_owned(),
                        (false, false, false) => run.status.as_str().to_owned(),
                    },
                    utc_time(run.created_ms),
                    span(Some(run.created_ms), run.ended_ms),
                ]);
            }
            if table.is_empty() && list.next_cursor.is_some() {
                eprintln!("no runs match among the newest this page looked at; older runs may");
            } else if table.is_empty() {
                eprintln!("no runs match");
            } else {
                out!("{}", table.render())?;
            }
            if let Some(cursor) = &list.next_cursor {
                // On stderr, as every note: stdout holds the table alone.
                eprintln!("next page: the same command, with the same filters, and --cursor {cursor}");
            }
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Signal { targets, flow, limit, filter, data, data_file } => {
            let data = json_argument("--data", data, data_file)?;
            let (run_id, step) = match signal_target(targets, flow).map_err(anyhow::Error::msg)? {
                SignalTarget::Run { run_id, step } => (run_id, step),
                SignalTarget::Flow { flow, step } => {
                    let selection = RunSelection { run_ids: Vec::new(), flow: Some(flow), limit, filter };
                    let runs = selected_runs(client, selection, "signal", |_| true).await?;
                    return signal_many(client, runs, &step, &data, session).await;
                }
            };
            crate::ensure_usage!(
                limit.is_none() && !filter.is_set(),
                "--limit, --label, --since and --until go with --flow"
            );
            let signalled = client.signal(&RunId(run_id.into()), step, data).await?;
            if session.json {
                print_json(&signalled)?;
            } else if signalled.applied {
                outln!(
                    "step {} of run {} took the signal; the run is {}",
                    signalled.step,
                    signalled.run_id,
                    signalled.status.as_str()
                )?;
            } else {
                outln!(
                    "step {} of run {} did not take the signal (it took or kept an earlier one, timed out, or the run \
                     ended; the run is {}): nothing changed",
                    signalled.step,
                    signalled.run_id,
                    signalled.status.as_str()
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Cancel { runs, reason } => {
            let one = names_one_run(&runs);
            let mut runs = selected_runs(client, runs, "cancel", |_| true).await?;
            if !one {
                let verb = Verb { doing: "cancelling", did: "cancelled", key: "cancelled" };
                let reason = reason.as_str();
                return for_each_run(runs, verb, "", session, |run_id| async move {
                    let cancelled = client.cancel(&run_id, reason).await;
                    (run_id, cancelled.map(|cancelled| cancelled.applied))
                })
                .await
                .map(|refused| refused.exit_code());
            }
            let cancelled = client.cancel(&runs.remove(0), reason).await?;
            if session.json {
                print_json(&cancelled)?;
            } else if cancelled.applied {
                outln!("run {} is cancelled", cancelled.run_id)?;
            } else {
                outln!("run {} had already ended: {}", cancelled.run_id, cancelled.status.as_str())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Redrive { run_ids, flow, status, from, limit, filter, reason, wait, timeout } => {
            let redrive = Redrive { from, reason };
            if flow.is_some() || status.is_some() {
                let status = status.unwrap_or(RunStatus::Failed);
                let query = ListRuns { flow, ..filter.query()? };
                let runs = runs_to_redrive(client, query, status, &redrive, limit).await?;
                return redrive.many(client, runs, session).await;
            }
            crate::ensure_usage!(!filter.is_set(), "--label, --since and --until go with --flow or --status");
            crate::ensure_usage!(
                !run_ids.is_empty(),
                "name the runs to redrive, or --flow / --status for the runs of a flow or of every flow that ended so"
            );
            crate::ensure_usage!(limit.is_none(), "--limit goes with --flow or --status: named runs are all redriven");
            let mut run_ids: Vec<RunId> = run_ids.into_iter().map(|run_id| RunId(run_id.into())).collect();
            if run_ids.len() != 1 {
                crate::ensure_usage!(!wait, "--wait waits for one run; name exactly one");
                return redrive.many(client, run_ids, session).await;
            }
            let run_id = run_ids.remove(0);
            let redriven = redrive.send(client, &run_id).await?;
            if !wait {
                if session.json {
                    print_json(&redriven)?;
                } else if redriven.status == RunStatus::Running {
                    let from = redrive.steps_named();
                    outln!("run {} is running again{from} (redrive {})", redriven.run_id, redriven.times)?;
                } else {
                    outln!(
                        "run {} was redriven (redrive {}) and ended again at once: {}",
                        redriven.run_id,
                        redriven.times,
                        redriven.status.as_str()
                    )?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "redrove run {run_id}{} (redrive {}); waiting up to {}",
                redrive.steps_named(),
                redriven.times,
                duration_ms(timeout.as_millis() as u64)
            );
            wait_and_print(client, Applied::Redriven(run_id), timeout, session).await
        }
        RunCommand::Pause { runs, reason } => pause_or_resume(client, true, runs, reason, session).await,
        RunCommand::Resume { runs, reason } => pause_or_resume(client, false, runs, reason, session).await,
        RunCommand::Submit { flow, version, input } => {
            let request = start_request(flow, version, input)?;
            check_deployed(client, &request.flow, version).await?;
            let submitted = client.submit(request).await?;
            if session.json {
                print_json(&json!({
                    "run_id": submitted.run_id,
                    "idempotency_key": submitted.idempotency_key,
                    "sequence": submitted.sequence,
                    "duplicate": submitted.duplicate,
                }))?;
            } else {
                outln!("{}", submitted.run_id)?;
                let note = if submitted.duplicate { " (a duplicate of an earlier submission)" } else { "" };
                eprintln!("stored as submission {}{note}; a coordinator starts the run", submitted.sequence);
            }
            Ok(ExitCode::SUCCESS)
        }
        RunCommand::Refused { limit } => refused_submits(client, session, limit as usize).await,
    }
}

/// `run refused`: the refused submits, newest first.
async fn refused_submits(client: &Client, session: &Session, limit: usize) -> anyhow::Result<ExitCode> {
    let refused = client.refused_submits(limit).await?;
    if session.json {
        let refused: Vec<Value> = refused
            .iter()
            .map(|submit| {
                json!({
                    "refused_ms": submit.refused_ms,
                    "code": submit.code,
                    "reason": submit.reason,
                    "submit_sequence": submit.submit_sequence,
                    "request": submit.request,
                })
            })
            .collect();
        print_json(&refused)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["REFUSED", "FLOW", "KEY", "CODE", "WHY"]);
    for submit in &refused {
        let (flow, key) = match &submit.request {
            Some(request) => {
                let flow = match request.version {
                    Some(version) => format!("{}@{version}", request.flow),
                    None => request.flow.clone(),
                };
                (flow, request.idempotency_key.clone().unwrap_or_else(|| "-".to_owned()))
            }
            None => ("-".to_owned(), "-".to_owned()),
        };
        table.row(vec![utc_time(submit.refused_ms), flow, key, submit.code.clone(), submit.reason.clone()]);
    }
    if table.is_empty() {
        eprintln!("no refused submits");
    } else {
        out!("{}", table.render())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What `run redrive` asks of each run.
struct Redrive {
    from: Vec<String>,
    reason: String,
}

impl Redrive {
    async fn send(&self, client: &Client, run_id: &RunId) -> flowgrid_sdk::Result<RunRedriven> {
        client.redrive_from(run_id, self.from.clone(), self.reason.as_str()).await
    }

    /// ` from step `a`` (or steps), for the line that says the run goes again.
    fn steps_named(&self) -> String {
        let steps: Vec<String> = self.from.iter().map(|step| format!("`{step}`")).collect();
        match steps.len() {
            0 => String::new(),
            1 => format!(" from step {}", steps[0]),
            _ => format!(" from steps {}", steps.join(", ")),
        }
    }

    /// Redrives `runs`, a few at a time, with progress; exit 1 if any was refused, saying
    /// on stderr how to redrive those alone (the same command again would redrive the
    /// others once more: a run that succeeded again still matches `--status succeeded`).
    async fn many(&self, client: &Client, runs: Vec<RunId>, session: &Session) -> anyhow::Result<ExitCode> {
        let verb = Verb { doing: "redriving", did: "redrove", key: "redriven" };
        let refused = for_each_run(runs, verb, &self.steps_named(), session, |run_id| async move {
            let outcome = self.send(client, &run_id).await.map(|_| true);
            (run_id, outcome)
        })
        .await?;
        if !refused.0.is_empty() {
            eprintln!(
                "hint: to redrive the {} refused run(s) alone, once the reason is dealt with: {}",
                refused.0.len(),
                self.command_for(&refused.0)
            );
        }
        Ok(refused.exit_code())
    }

    /// The `flowgrid run redrive` command that asks the same of `runs`, and of no other run.
    fn command_for(&self, runs: &[RunId]) -> String {
        let mut words = vec!["flowgrid".to_owned(), "run".to_owned(), "redrive".to_owned()];
        words.extend(runs.iter().map(|run_id| shell_word(run_id.as_str()).into_owned()));
        for step in &self.from {
            words.extend(["--from".to_owned(), shell_word(step).into_owned()]);
        }
        words.extend(["--reason".to_owned(), shell_word(&self.reason).into_owned()]);
        words.join(" ")
    }
}

/// The runs `run redrive --flow/--status` redrives: those `query` lists that ended in
/// `status` (succeeded ones only from a step).
async fn runs_to_redrive(
    client: &Client,
    query: ListRuns,
    status: RunStatus,
    redrive: &Redrive,
    limit: Option<u64>,
) -> anyhow::Result<Vec<RunId>> {
    crate::ensure_usage!(
        matches!(status, RunStatus::Failed | RunStatus::TimedOut | RunStatus::Cancelled)
            || (status == RunStatus::Succeeded && !redrive.from.is_empty()),
        "--status {}: only runs that failed, timed out or were cancelled are redriven, and succeeded runs from \
         a step named with --from",
        status.as_str()
    );
    matching_runs(client, ListRuns { status: Some(status), ..query }, limit, |_| true).await
}

/// Pauses (`pause`) or resumes runs: those named, or the running runs of `flow` (for a
/// resume, those paused).
async fn pause_or_resume(
    client: &Client,
    pause: bool,
    selection: RunSelection,
    reason: String,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    let verb = if pause { "pause" } else { "resume" };
    let one = names_one_run(&selection);
    let runs = selected_runs(client, selection, verb, |run| pause || run.paused).await?;
    let reason = reason.as_str();
    if let (true, [run_id]) = (one, runs.as_slice()) {
        let outcome = if pause { client.pause(run_id, reason).await? } else { client.resume(run_id, reason).await? };
        if session.json {
            print_json(&outcome)?;
        } else if outcome.status.is_terminal() && outcome.applied {
            // A resume that let the run's held steps go, and it ended at once.
            outln!("run {} {verb}d and ended: {}", outcome.run_id, outcome.status.as_str())?;
        } else if outcome.status.is_terminal() {
            outln!("run {} had already ended: {}; nothing changed", outcome.run_id, outcome.status.as_str())?;
        } else {
            let state = match (outcome.paused, outcome.applied) {
                (true, true) => "is paused",
                (true, false) => "is paused already; nothing changed",
                (false, true) => "is running again",
                (false, false) => "is not paused; nothing changed",
            };
            outln!("run {} {state}", outcome.run_id)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let verb = match pause {
        true => Verb { doing: "pausing", did: "paused", key: "paused" },
        false => Verb { doing: "resuming", did: "resumed", key: "resumed" },
    };
    for_each_run(runs, verb, "", session, |run_id| async move {
        let outcome = match pause {
            true => client.pause(&run_id, reason).await,
            false => client.resume(&run_id, reason).await,
        };
        (run_id, outcome.map(|outcome| outcome.applied))
    })
    .await
    .map(|refused| refused.exit_code())
}

/// Sends `data` to step `step` of every run of `runs`: a run whose step waits takes it; one
/// whose step has not started or is over is left as it was.
async fn signal_many(
    client: &Client,
    runs: Vec<RunId>,
    step: &str,
    data: &Value,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    let verb = Verb { doing: "signalling", did: "signalled", key: "signalled" };
    let detail = format!(" at step {step}");
    for_each_run(runs, verb, &detail, session, |run_id| async move {
        let signalled = match client.signal(&run_id, step.to_owned(), data.clone()).await {
            Ok(signalled) => Ok(signalled.applied),
            // Not at the step yet: as it was.
            Err(error) if error.api().is_some_and(|api| api.code == ErrorCode::Conflict) => Ok(false),
            Err(error) => Err(error),
        };
        (run_id, signalled)
    })
    .await
    .map(|refused| refused.exit_code())
}

/// Whether `selection` names one run and no flow: the command answers for that run alone
/// (`{"run_id", "status", "applied"}`), and for a flow's runs in the form of many, however
/// many match (`{"matched", ...}`), so that a script reads one form for one way of asking.
fn names_one_run(selection: &RunSelection) -> bool {
    selection.flow.is_none() && selection.run_ids.len() == 1
}

/// The runs a selection names, or with `--flow` the running runs of the flow that match its
/// filter and `keep`; `verb` says what is done to them, for errors.
async fn selected_runs(
    client: &Client,
    selection: RunSelection,
    verb: &str,
    keep: impl Fn(&flowgrid_proto::RunSummary) -> bool,
) -> anyhow::Result<Vec<RunId>> {
    let RunSelection { run_ids, flow, limit, filter } = selection;
    crate::ensure_usage!(flow.is_some() || !run_ids.is_empty(), "name the runs to {verb}, or --flow for a flow's runs");
    crate::ensure_usage!(
        flow.is_some() || (limit.is_none() && !filter.is_set()),
        "--limit, --label, --since and --until go with --flow"
    );
    Ok(match flow {
        Some(flow) => {
            let query = ListRuns { flow: Some(flow), status: Some(RunStatus::Running), ..filter.query()? };
            matching_runs(client, query, limit, keep).await?
        }
        None => run_ids.into_iter().map(|run_id| RunId(run_id.into())).collect(),
    })
}

/// How long `run submit` waits for a coordinator to say whether the flow is deployed.
const SUBMIT_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Refuses to submit a run of a flow (or version) the grid says is not deployed: the
/// coordinator that takes the submission would drop it, telling no one. With no
/// coordinator answering in time (the case durable submits are for), it is submitted.
async fn check_deployed(client: &Client, flow: &str, version: Option<u32>) -> anyhow::Result<()> {
    match tokio::time::timeout(SUBMIT_CHECK_WAIT, client.flow(flow, version)).await {
        Ok(Err(flowgrid_sdk::Error::Api(refusal))) if refusal.code == flowgrid_sdk::ErrorCode::NotFound => {
            // The grid's refusal says what to deploy; a submit of it would be dropped.
            anyhow::bail!("{}; nothing was submitted", refusal.message)
        }
        _ => Ok(()),
    }
}

fn start_request(flow: String, version: Option<u32>, input: RunInput) -> anyhow::Result<StartRun> {
    let RunInput { input, input_file, idempotency_key, labels, at } = input;
    let input = json_argument("--input", input, input_file)?;
    let labels = crate::args::labels_once(labels).map_err(|message| anyhow::anyhow!("--label: {message}"))?;
    Ok(StartRun { flow, version, input, idempotency_key, labels, start_at_ms: at })
}

/// `flowgrid task complete`: sends an async task's result with its token.
pub(super) async fn complete_task(
    command: TaskCommand,
    client: &Client,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    let TaskCommand::Complete { token, output, output_file, error, message, not_retryable } = command;
    let token = flowgrid_sdk::TaskToken::decode(&token).map_err(|problem| anyhow::anyhow!("{problem}"))?;
    let outcome = match error {
        Some(code) => Err(flowgrid_sdk::TaskError {
            code,
            message: message.unwrap_or_else(|| "failed as its task token was completed".to_owned()),
            retryable: !not_retryable,
        }),
        None => Ok(json_argument("--output", output, output_file)?),
    };
    let applied = client.complete_task(&token, outcome).await?;
    let attempt = &token.attempt;
    let item = attempt.item.map(|item| format!("[{item}]")).unwrap_or_default();
    if session.json {
        print_json(&serde_json::json!({"attempt": attempt, "applied": applied}))?;
    } else if applied {
        outln!("step {}{item} of run {} took the result (attempt {})", attempt.step, attempt.run_id, attempt.attempt)?;
    } else {
        outln!(
            "not applied: attempt {} of step {}{item} of run {} is no longer open (completed already, timed out, or \
             its run ended; `flowgrid run get {}` shows it)",
            attempt.attempt,
            attempt.step,
            attempt.run_id,
            attempt.run_id
        )?;
    }
    Ok(if applied { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A JSON value given as text (`flag`) or in a file (`-` for stdin); null when neither.
fn json_argument(flag: &str, text: Option<String>, file: Option<std::path::PathBuf>) -> anyhow::Result<Value> {
    Ok(match (text, file) {
        (Some(text), _) => serde_json::from_str(&text).with_context(|| format!("{flag} is not valid JSON"))?,
        (None, Some(path)) => {
            let text = super::read_text(&path)?;
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?
        }
        (None, None) => Value::Null,
    })
}

/// The run as `run.get` gives it, or without its data (saying so on stderr) when it is
/// too large for one message.
async fn get_run(client: &Client, run_id: &RunId) -> anyhow::Result<RunView> {
    let (view, left_out) = client.get_or_without_data(run_id).await?;
    if let Some(refusal) = left_out {
        // Its data goes over NATS a record at a time.
        eprintln!(
            "note: the run's input and outputs are left out ({}); read them with `flowgrid run history {run_id}`",
            refusal.message
        );
    }
    Ok(view)
}

/// Waits for the run the command started or redrove (`applied`) and prints it; exit 0 only
/// if it succeeded. Every failure from here on carries `applied`: the run was changed
/// already, and the same command run again would change it again.
async fn wait_and_print(
    client: &Client,
    applied: Applied,
    timeout: Duration,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    let run_id = applied.run_id().clone();
    wait_and_print_run(client, &run_id, timeout, session).await.map_err(|error| error.context(applied))
}

/// [`wait_and_print`] of `run_id`.
async fn wait_and_print_run(
    client: &Client,
    run_id: &RunId,
    timeout: Duration,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    let view = match client.wait(run_id, timeout).await {
        Ok(view) => view,
        Err(flowgrid_sdk::Error::Api(refusal)) if refusal.code == flowgrid_sdk::ErrorCode::PayloadTooLarge => {
            get_run(client, run_id).await?
        }
        Err(flowgrid_sdk::Error::Timeout { .. }) => match get_run(client, run_id).await? {
            // It ended as the wait ran out: its end is the answer.
            view if view.status.is_terminal() => view,
            view => {
                print_run(&view, session)?;
                eprintln!(
                    "run {run_id} is still {} after {}",
                    view.status.as_str(),
                    duration_ms(timeout.as_millis() as u64)
                );
                hint_waiting_steps(client, &view, session).await;
                return Ok(ExitCode::FAILURE);
            }
        },
        Err(error) => return Err(error.into()),
    };
    print_run(&view, session)?;
    Ok(if view.status == RunStatus::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Names, on stderr, what a running run waits for that only its user can give: a signal,
/// or a worker for a pool whose tasks wait with none (the usual reasons a run seems
/// stuck). Best effort: what cannot be read is left out.
/// How long after a run's end its failure handler surely started, if the grid took it
/// (its start goes out from the failed run's shard after the commit that ended it).
const HANDLER_START_GRACE_MS: u64 = 2_000;

/// Says so when the failure handler the run names was never started: the grid refused it
/// (no such flow, an input its schema refuses), and its coordinator's log says why.
async fn hint_refused_handler(client: &Client, view: &RunView, session: &Session) {
    let Some(handler) = view.on_failure_run.as_ref().filter(|_| !session.json) else { return };
    if view.ended_ms.is_none_or(|ended| now_ms() < ended.saturating_add(HANDLER_START_GRACE_MS)) {
        return;
    }
    if client.get_without_data(handler).await.is_err_and(|error| error.is_not_found()) {
        eprintln!(
            "hint: the failure handler run {handler} was not started: the grid refused its start (its flow is not \
             deployed, or its input does not match the flow's input_schema); the coordinator's log says which"
        );
    }
}

async fn hint_waiting_steps(client: &Client, view: &RunView, session: &Session) {
    if session.json || view.status != RunStatus::Running {
        return;
    }
    let running: Vec<&StepView> = view.steps.iter().filter(|step| step.status == StepStatus::Running).collect();
    for step in running.iter().filter(|step| step.kind == "signal") {
        eprintln!(
            "hint: step {} waits for a signal: flowgrid run signal {} {} --data JSON",
            step.id, view.run_id, step.id
        );
    }
    if !running.iter().any(|step| matches!(step.kind.as_str(), "task" | "map")) {
        return;
    }
    let (Ok(flow), Ok(pools)) = tokio::join!(client.flow(&view.flow, Some(view.version)), pool_backlogs(session))
    else {
        return;
    };
    for step in running {
        let Some(pool) = flow.definition.steps.iter().find(|defined| defined.id() == step.id).and_then(Step::pool)
        else {
            continue;
        };
        if let Some(backlog) = pools.iter().find(|backlog| backlog.pool == pool && backlog.has_no_worker()) {
            eprintln!("hint: step {} waits on {}", step.id, no_worker_hint(backlog));
        }
    }
}

/// Widths the `SEQ` and `AT` columns of `run history` keep on every page of a history
/// longer than one page (records up to 9,999,999, times since the start up to `+99h59m`),
/// so that its pages line up.
const HISTORY_PAGED_WIDTHS: [usize; 3] = [7, 7, 0];

/// Prints a run's history, up to `limit` records, page by page as it reads them: a long one
/// (a map of 10,000 items has over 20,000 records) is never held whole, and a reader that
/// stops reading (`| head`) ends the command at the next page.
async fn history(
    client: &Client,
    run_id: &RunId,
    mut after: Option<u64>,
    limit: Option<u64>,
    session: &Session,
) -> anyhow::Result<ExitCode> {
    let mut printed = 0u64;
    let mut table = PagedTable::new(&["SEQ", "AT", "WHAT"]);
    let mut started_ms = None;
    let mut next;
    let mut first_page = true;
    loop {
        let left = limit.map(|limit| limit.saturating_sub(printed));
        let page_limit = left.map(|left| left.min(1_000) as u32);
        let page = client.history(run_id, after, page_limit).await?;
        // Written once the run is found: a refusal is the only JSON answer on stdout.
        if session.json && first_page {
            out!("{}", history_json::head(run_id)?)?;
        }
        first_page = false;
        next = page.next;
        let more = match (next, left) {
            (None, _) => false,
            (Some(_), Some(left)) => (page.records.len() as u64) < left,
            (Some(_), None) => true,
        };
        if session.json {
            let mut text = String::new();
            for record in &page.records {
                text.push_str(&history_json::record(record, printed == 0)?);
                printed += 1;
            }
            out!("{text}")?;
        } else {
            if printed == 0 {
                // Times since the start when the first page begins with it.
                started_ms = page.records.first().filter(|record| record.seq == 0).map(|record| record.at_ms);
            }
            let rows: Vec<Vec<String>> = page
                .records
                .iter()
                .map(|record| {
                    let at = match started_ms {
                        Some(started_ms) => format!("+{}", duration_ms(record.at_ms.saturating_sub(started_ms))),
                        None => utc_time(record.at_ms),
                    };
                    vec![record.seq.to_string(), at, crate::history::describe(record)]
                })
                .collect();
            // A history of one page: its columns as wide as it needs, as any table's.
            let min_widths: &[usize] = if more { &HISTORY_PAGED_WIDTHS } else { &[] };
            out!("{}", table.page(rows, min_widths))?;
            printed += page.records.len() as u64;
        }
        output::stop_if_reader_gone();
        match (next, more) {
            (Some(last), true) => after = Some(last),
            _ => break,
        }
    }
    if session.json {
        out!("{}", history_json::tail(printed > 0, next))?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(last) = next {
        eprintln!("more records follow: flowgrid run history {run_id} --after {last}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `run history --json` written a record at a time as its pages come, in the shape and
/// layout [`print_json`] gives one `run.history` answer: `{"run_id", "records", "next"}`.
mod history_json {
    use flowgrid_model::RunId;
    use flowgrid_proto::HistoryRecord;

    /// How deep a record sits in the answer: inside the object, inside `records`.
    const RECORD_INDENT: &str = "    ";

    /// Up to the opening of `records`.
    pub(super) fn head(run_id: &RunId) -> serde_json::Result<String> {
        Ok(format!("{{\n  \"run_id\": {},\n  \"records\": [", serde_json::to_string(run_id)?))
    }

    /// One record of `records`; `first` for the first one, which no comma goes before.
    pub(super) fn record(record: &HistoryRecord, first: bool) -> serde_json::Result<String> {
        // A JSON string holds no line break: each line of the record is one of its own.
        let pretty = serde_json::to_string_pretty(record)?.replace('\n', &format!("\n{RECORD_INDENT}"));
        Ok(format!("{}\n{RECORD_INDENT}{pretty}", if first { "" } else { "," }))
    }

    /// The close of `records` (`any`: it holds a record) and `next`, when more follow.
    pub(super) fn tail(any: bool, next: Option<u64>) -> String {
        let records = if any { "\n  ]" } else { "]" };
        let next = next.map(|next| format!(",\n  \"next\": {next}")).unwrap_or_default();
        format!("{records}{next}\n}}\n")
    }
}

fn print_run(view: &RunView, session: &Session) -> anyhow::Result<()> {
    if session.json {
        return print_json(view);
    }
    out!("{}", render_run(view))?;
    // A step that ran in the engine (a transform, a condition) failed without attempts:
    // its error above is all there is.
    if view.error.is_some() && view.steps.iter().any(|step| step.attempts > 0 && step.error.is_some()) {
        eprintln!("hint: every attempt, its error and when: flowgrid run history {}", view.run_id);
    }
    Ok(())
}

/// A run as `run get` prints it: summary, step table, then output or error.
pub(super) fn render_run(view: &RunView) -> String {
    let mut text = String::new();
    text.push_str(&format!("run       {}\n", view.run_id));
    text.push_str(&format!("flow      {}@{}\n", view.flow, view.version));
    text.push_str(&format!("status    {}\n", view.status.as_str()));
    if let Some(parent) = &view.parent {
        let item = parent.item.map(|item| format!(", item {item}")).unwrap_or_default();
        text.push_str(&format!("parent    {} (step {}{item})\n", parent.run_id, parent.step));
    }
    text.push_str(&format!("created   {}\n", utc_time(view.created_ms)));
    if !view.labels.is_empty() {
        let labels: Vec<String> = view.labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
        text.push_str(&format!("labels    {}\n", printable(&labels.join(", "))));
    }
    if let Some(redriven) = &view.redriven {
        text.push_str(&format!("redriven  {}\n", output::redriven(redriven)));
    }
    if let Some(paused) = &view.paused {
        let paused = output::paused(paused);
        text.push_str(&format!("paused    {} (`flowgrid run resume {}`)\n", printable(&paused), view.run_id));
    }
    if let Some(delayed) = &view.delayed {
        text.push_str(&format!("delayed   {}\n", output::delayed(delayed)));
    }
    if let Some(queued) = &view.queued {
        text.push_str(&format!("queued    {}\n", output::queued(queued)));
    }
    if let Some(handler) = &view.on_failure_run {
        text.push_str(&format!("handler   run {handler} (its flow's on_failure)\n"));
    }
    let duration = match (view.ended_ms, &view.delayed) {
        (Some(ended), _) => duration_ms(ended.saturating_sub(view.created_ms)),
        (None, Some(_)) => "not started yet (delayed)".to_owned(),
        (None, None) => format!("{} so far", duration_ms(now_ms().saturating_sub(view.created_ms))),
    };
    text.push_str(&format!("duration  {duration}\n"));
    if !view.steps.is_empty() {
        text.push('\n');
        text.push_str(&step_table(&view.steps).render());
        for step in &view.steps {
            match (&step.child_run, step.iteration) {
                (Some(child), Some(iteration)) => {
                    text.push_str(&format!("step {} runs child run {child} (loop iteration {iteration})\n", step.id))
                }
                (Some(child), None) => text.push_str(&format!("step {} runs child run {child}\n", step.id)),
                (None, _) => {}
            }
            if let (Some(items), "subflow") = (&step.items, step.kind.as_str()) {
                text.push_str(&format!(
                    "step {} runs a child run per item ({}): flowgrid run list --parent {}\n",
                    step.id, items.total, view.run_id
                ));
            }
            match (step.cached, step.items.is_some()) {
                (0, _) => {}
                (1, false) => text.push_str(&format!("step {}: result from the task cache\n", step.id)),
                (cached, _) => text.push_str(&format!("step {}: {cached} results from the task cache\n", step.id)),
            }
            if let Some(progress) = &step.progress {
                text.push_str(&format!("step {} progress: {progress}\n", step.id));
            }
            if let Some(error) = &step.error {
                let caught = if step.caught { " (caught)" } else { "" };
                let error = format!("{}: {}", error.code, error.message);
                text.push_str(&format!("step {} failed{caught}: {}\n", step.id, printable(&error)));
            }
        }
    }
    if let Some(output) = &view.output {
        let pretty = serde_json::to_string_pretty(output).unwrap_or_else(|_| output.to_string());
        text.push_str(&format!("\noutput:\n{pretty}\n"));
    }
    if let Some(error) = &view.error {
        text.push_str(&format!("\nerror: {}\n", printable(&format!("{}: {}", error.code, error.message))));
    }
    text
}

fn step_table(steps: &[StepView]) -> Table {
    let mut table = Table::new(&["STEP", "KIND", "STATUS", "ATTEMPTS", "DURATION MS", "ITEMS"]);
    for step in steps {
        let status =
            if step.caught { format!("{} (caught)", step.status.as_str()) } else { step.status.as_str().to_owned() };
        let duration = match (step.started_ms, step.ended_ms) {
            (Some(started), Some(ended)) => ended.saturating_sub(started).to_string(),
            _ => "-".to_owned(),
        };
        let items = step.items.as_ref().map(item_counts).unwrap_or_default();
        table.row(vec![step.id.clone(), step.kind.clone(), status, step.attempts.to_string(), duration, items]);
    }
    table
}

#[cfg(test)]
mod tests {
    use flowgrid_engine::{Delayed, ItemCounts, Paused, Queued, Redriven, StepStatus, TaskError};
    use flowgrid_model::ParentRef;

    use super::*;

    #[test]
    fn a_run_prints_its_steps_items_and_output() {
        let step = |id: &str, kind: &str, items| StepView {
            id: id.into(),
            kind: kind.into(),
            status: StepStatus::Succeeded,
            attempts: 2,
            cached: 0,
            started_ms: Some(1_000),
            ended_ms: Some(1_042),
            output: None,
            error: None,
            progress: None,
            caught: false,
            items,
            child_run: None,
            child_round: 0,
            iteration: None,
        };
        let mut fan_out = step("fan", "map", Some(ItemCounts { total: 10, succeeded: 9, failed: 1, running: 0 }));
        fan_out.error = Some(TaskError { code: "boom".into(), message: "item 3".into(), retryable: true });
        fan_out.caught = true;
        fan_out.cached = 4;
        let mut child = step("encode", "subflow", None);
        child.child_run = Some(RunId("c-1".into()));
        let mut agent = step("agent", "subflow", None);
        agent.child_run = Some(RunId("c-2".into()));
        agent.iteration = Some(3);
        let mut first = step("first", "task", None);
        first.progress = Some(json!({"done": 40}));
        first.cached = 1;
        let view = RunView {
            run_id: RunId("r-1".into()),
            flow: "demo".into(),
            version: 3,
            status: RunStatus::Succeeded,
            input: Value::Null,
            output: Some(json!({"n": 1})),
            error: None,
            created_ms: 0,
            ended_ms: Some(1_500),
            parent: Some(ParentRef {
                run_id: RunId("p-1".into()),
                step: "call".into(),
                item: None,
                depth: 1,
                round: 0,
            }),
            redriven: Some(Redriven { times: 2, last_ms: 1_000 }),
            paused: Some(Paused { since_ms: 1_200, reason: "db down".into(), held: vec!["store".into()] }),
            queued: Some(Queued { since_ms: 1_000, held: Vec::new() }),
            delayed: Some(Delayed { until_ms: 60_000, held: vec!["first".into()] }),
            on_failure_run: Some(RunId("h-1".into())),
            steps: vec![
                first,
                fan_out,
                child,
                agent,
                step("each", "subflow", Some(ItemCounts { total: 4, succeeded: 4, failed: 0, running: 0 })),
            ],
            labels: Default::default(),
            data_left_out: false,
        };
        let text = render_run(&view);
        assert!(text.contains("flow      demo@3\n"), "{text}");
        assert!(text.contains("duration  1.5s\n"), "{text}");
        assert!(text.contains("first   task     succeeded           2         42"), "{text}");
        assert!(text.contains("10/10 (1 failed)"), "{text}");
        assert!(text.contains("step fan failed (caught): boom: item 3"), "{text}");
        assert!(text.contains("step first progress: {\"done\":40}\n"), "{text}");
        assert!(text.contains("step first: result from the task cache\n"), "{text}");
        assert!(text.contains("step fan: 4 results from the task cache\n"), "{text}");
        assert!(text.contains("parent    p-1 (step call)\n"), "{text}");
        assert!(text.contains("redriven  2 times, last at 1970-01-01"), "{text}");
        let paused = "paused    since 1970-01-01T00:00:01Z: db down; holding step store (`flowgrid run resume r-1`)\n";
        assert!(text.contains(paused), "{text}");
        let queued = "queued    since 1970-01-01T00:00:01Z: waiting for its turn under its flow's concurrency limit\n";
        assert!(text.contains(queued), "{text}");
        let delayed = "delayed   until 1970-01-01T00:01:00Z: the start time it was started with; holding step first\n";
        assert!(text.contains(delayed), "{text}");
        assert!(text.contains("step encode runs child run c-1\n"), "{text}");
        assert!(text.contains("handler   run h-1 (its flow's on_failure)\n"), "{text}");
        assert!(text.contains("step agent runs child run c-2 (loop iteration 3)\n"), "{text}");
        assert!(text.contains("step each runs a child run per item (4): flowgrid run list --parent r-1\n"), "{text}");
        assert!(text.ends_with("output:\n{\n  \"n\": 1\n}\n"), "{text}");
    }

    #[test]
    fn the_runs_a_redrive_left_are_named_in_a_command_of_their_own() {
        let redrive = Redrive { from: vec!["summarize".into(), "fan out".into()], reason: "the model's bug".into() };
        let refused = [RunId("01a2-r1".into()), RunId("01a2-r9".into())];
        assert_eq!(
            redrive.command_for(&refused),
            "flowgrid run redrive 01a2-r1 01a2-r9 --from summarize --from 'fan out' --reason 'the model'\\''s bug'"
        );
        let plain = Redrive { from: Vec::new(), reason: "redriven from the command line".into() };
        assert_eq!(
            plain.command_for(&refused[..1]),
            "flowgrid run redrive 01a2-r1 --reason 'redriven from the command line'"
        );
    }

    #[test]
    fn a_history_written_page_by_page_in_json_is_the_answer_printed_whole() {
        use flowgrid_proto::{HistoryRecord, HistoryStart, RunHistory};
        let start = HistoryStart {
            flow: "f".into(),
            version: 1,
            input: json!({"text": "a\nb", "list": [1, {"deep": []}]}),
            parent: None,
            labels: Default::default(),
            queued: false,
            start_at_ms: None,
        };
        let records = vec![
            HistoryRecord { seq: 0, at_ms: 5, started: Some(start), event: None },
            HistoryRecord {
                seq: 1,
                at_ms: 9,
                started: None,
                event: Some(flowgrid_engine::Event::CancelRequested { reason: "done".into() }),
            },
        ];
        let run_id = RunId("r-1".into());
        for (records, next) in [(records, None), (Vec::new(), None), (Vec::new(), Some(12))] {
            let whole = RunHistory { run_id: run_id.clone(), records: records.clone(), next };
            let mut text = history_json::head(&run_id).unwrap();
            for (index, record) in records.iter().enumerate() {
                text.push_str(&history_json::record(record, index == 0).unwrap());
            }
            text.push_str(&history_json::tail(!records.is_empty(), next));
            assert_eq!(text, format!("{}\n", serde_json::to_string_pretty(&whole).unwrap()));
        }
    }

    #[test]
    fn input_comes_from_json_text() {
        let input = RunInput {
            input: Some("{\"a\": [1]}".into()),
            input_file: None,
            idempotency_key: None,
            labels: Vec::new(),
            at: Some(60_000),
        };
        let start = start_request("f".into(), None, input).unwrap();
        assert_eq!((start.input, start.start_at_ms), (json!({"a": [1]}), Some(60_000)));
        let broken = RunInput {
            input: Some("{a".into()),
            input_file: None,
            idempotency_key: None,
            labels: Vec::new(),
            at: None,
        };
        assert!(start_request("f".into(), None, broken).unwrap_err().to_string().contains("--input"));
    }
}
