//! `flowgrid flow test`: runs a flow definition against test cases, without a grid.
//!
//! The engine is a pure state machine (events in, effects out), so a run can be driven
//! here exactly as a coordinator drives it, with the outside world scripted by the case:
//! each task attempt gets the result the case gives its step, each child run of a subflow
//! step ends as the case says, each signal step gets the case's data once it waits, and
//! timers (waits, retry backoffs, timeouts) fire as soon as nothing else is left to do, on
//! a clock that jumps to them. The run's steps and output print as `run get` prints them,
//! and the case's `expect` decides the exit code; the steps no case ran to an end are
//! listed last.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};

use flowgrid_engine::{Applied, Effect, Event, HandlerStart, Run, RunStart, RunStatus, RunView, StepStatus, TaskError};
use flowgrid_model::limits::{msgpack_bytes, nesting_depth, ErrorCodeProblem};
use flowgrid_model::{parse_definition, AttemptId, Evaluator, FlowPlan, Labels, Limits, Millis, PlanStepKind, RunId};

use crate::output::{now_ms, out, outln, print_json};
use crate::Session;

/// Events one case may apply before it is judged to loop without end.
const EVENTS_MAX: usize = 200_000;

/// A test case: the run's input, what the world answers, and what the run must end with.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Case {
    #[serde(default)]
    input: Value,
    /// By task or map step id: the result of its attempts (a list: one per attempt, the
    /// last one for every attempt after it); `step[2]` answers item 2 of a map instead.
    #[serde(default)]
    tasks: HashMap<String, Answers>,
    /// By subflow step id: how its child runs end (`step[2]`: item 2's child).
    #[serde(default)]
    subflows: HashMap<String, Answers>,
    /// By signal step id: the data it is sent once it waits.
    #[serde(default)]
    signals: HashMap<String, Value>,
    #[serde(default)]
    expect: Option<Expect>,
}

/// The attempts of each step (and item) the run asked the case to answer: a task step's
/// dispatches, a subflow step's child runs.
type Asked = HashMap<(String, Option<u32>), usize>;

/// The answers of a step's attempts: written as one answer, or a list of one per attempt
/// (at least one; the last stands for every attempt after it).
#[derive(Debug, Deserialize)]
#[serde(try_from = "Value")]
struct Answers(Vec<Answer>);

impl TryFrom<Value> for Answers {
    type Error = String;

    /// Read by hand rather than as an untagged enum, so that a mistake in an answer is
    /// named (`unknown field `eror``) instead of "matches no variant".
    fn try_from(value: Value) -> Result<Answers, String> {
        let answers = match value {
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(nth, item)| serde_json::from_value(item).map_err(|error| format!("answer {nth}: {error}")))
                .collect::<Result<Vec<Answer>, String>>()?,
            one => vec![serde_json::from_value(one).map_err(|error| error.to_string())?],
        };
        if answers.is_empty() {
            return Err("an empty list of answers: give at least one".to_owned());
        }
        Ok(Answers(answers))
    }
}

impl Answers {
    /// The answer to the `nth` attempt (from 0).
    fn nth(&self, nth: usize) -> &Answer {
        &self.0[nth.min(self.0.len() - 1)]
    }
}

/// What a worker (or a child run) answers: an output, an error, or the task's input back,
/// exactly one of them ([`answer_problem`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    /// `output: null` is an output, `null`.
    #[serde(default, deserialize_with = "some_value")]
    output: Option<Value>,
    #[serde(default)]
    error: Option<CaseError>,
    /// The output is the task's (or child's) input.
    #[serde(default)]
    echo: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseError {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default = "yes")]
    retryable: bool,
}

fn yes() -> bool {
    true
}

/// What the run must end with.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    status: Option<RunStatus>,
    /// The run's output; `null` expects none (or a `null` output).
    #[serde(default, deserialize_with = "some_value")]
    output: Option<Value>,
    /// Error code of a run that did not succeed.
    #[serde(default)]
    error: Option<String>,
    /// Step statuses by step id.
    #[serde(default)]
    steps: HashMap<String, StepStatus>,
    /// The input the flow's failure handler (`on_failure`) starts with; `null` for no
    /// handler start at all.
    #[serde(default, deserialize_with = "some_value")]
    on_failure: Option<Value>,
}

/// Reads a present field as `Some`, `null` included (`Some(Value::Null)`).
fn some_value<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// How a case's run ended: its view, and the failure handler it started, if any.
struct Played {
    view: RunView,
    handler: Option<HandlerStart>,
}

/// Runs `definition` against every case; exit 1 if any case's expectations fail or it
/// cannot be played to the end.
pub(super) fn test(definition: &Path, cases: &[PathBuf], session: &Session) -> anyhow::Result<ExitCode> {
    let limits = Limits::default();
    let evaluator = Evaluator::new(&limits);
    let text = super::read_text(definition)?;
    let parsed =
        parse_definition(&text, &limits).map_err(|error| anyhow::anyhow!("{}: {error}", definition.display()))?;
    // What a deploy refuses too: a definition the grid would not take passes no test.
    flowgrid_model::check_new(&parsed, &evaluator, &limits)
        .map_err(|error| anyhow::anyhow!("{}: {error}", definition.display()))?;
    let plan = Arc::new(
        FlowPlan::compile(flowgrid_model::with_deploy_defaults(parsed), 1, &evaluator, &limits)
            .map_err(|error| anyhow::anyhow!("{}: {error}", definition.display()))?,
    );
    let mut all_passed = true;
    let mut reports = Vec::new();
    // The steps some case ran to an end: the others are what no case tests.
    let mut ran = BTreeSet::new();
    for path in cases {
        let text = super::read_text(path)?;
        let case: Case =
            serde_norway::from_str(&text).with_context(|| format!("{}: not a test case", path.display()))?;
        let mut partial = None;
        let (played, problems) = match play(&plan, &evaluator, &case, &mut partial) {
            Ok(played) => {
                let problems = case.expect.as_ref().map(|expect| judge(expect, &played)).unwrap_or_default();
                ran.extend(steps_ended(&played.view));
                (Some(played), problems)
            }
            Err(error) => {
                // The steps that ended before the case could go no further did run.
                ran.extend(partial.iter().flat_map(steps_ended));
                (None, vec![format!("{error:#}")])
            }
        };
        let handler = played.as_ref().and_then(|played| played.handler.as_ref());
        let view = played.as_ref().map(|played| &played.view);
        all_passed &= problems.is_empty();
        if session.json {
            let handler = handler.map(|handler| json!({"flow": handler.flow, "input": handler.input}));
            reports.push(json!({"case": path.display().to_string(), "passed": problems.is_empty(),
                                "problems": problems, "run": view, "on_failure": handler}));
            continue;
        }
        let verdict = if problems.is_empty() { "passed" } else { "FAILED" };
        outln!("== {} ({verdict})", path.display())?;
        if let Some(view) = view {
            out!("{}", super::run::render_run(view))?;
        }
        if let Some(handler) = handler {
            outln!("on failure: starts a run of {} with input {}", handler.flow, handler.input)?;
        }
        for problem in &problems {
            outln!("  {problem}")?;
        }
    }
    let not_run: Vec<&str> = plan.steps.iter().map(|step| step.id.as_str()).filter(|id| !ran.contains(*id)).collect();
    if session.json {
        print_json(&json!({"cases": reports, "steps_not_run": not_run}))?;
    } else if not_run.is_empty() {
        outln!("every step of flow {} ran to an end in some case", plan.name)?;
    } else {
        outln!("steps of flow {} that no case ran to an end: {}", plan.name, not_run.join(", "))?;
    }
    Ok(if all_passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// An answer of a case's `tasks` or `subflows` for one item of a step (`step[2]`), which
/// the run must ask for.
struct ItemAnswer<'a> {
    section: &'static str,
    key: &'a str,
    step: &'a str,
    item: u32,
}

/// Refuses an answer for a step the flow does not have, or has of another kind, or for an
/// item of a step that has none: a misspelt step answers nothing, and its case would test
/// other than it says. Refuses an answer the grid would not take from a worker, too
/// ([`answer_problem`]). The answers given to single items, which the run must ask for.
fn check_answers<'a>(plan: &FlowPlan, case: &'a Case, limits: &Limits) -> anyhow::Result<Vec<ItemAnswer<'a>>> {
    let sections = [
        ("tasks", case.tasks.keys().collect::<Vec<_>>(), "task or map"),
        ("subflows", case.subflows.keys().collect(), "subflow"),
        ("signals", case.signals.keys().collect(), "signal"),
    ];
    let mut items = Vec::new();
    for (section, mut keys, kinds) in sections {
        let fits = |kind: &PlanStepKind| match section {
            "tasks" => matches!(kind, PlanStepKind::Task(_) | PlanStepKind::Map { .. }),
            "subflows" => matches!(kind, PlanStepKind::Subflow(_)),
            _ => matches!(kind, PlanStepKind::Signal { .. }),
        };
        keys.sort();
        for key in keys {
            // `step[2]` answers item 2 of the step.
            let (id, item) = parse_key(key).map_err(|problem| anyhow::anyhow!("`{section}` key `{key}` {problem}"))?;
            match plan.steps.iter().find(|step| step.id == id) {
                Some(step) if fits(&step.kind) => {
                    if let Some(item) = item {
                        if !has_items(&step.kind) {
                            bail!(
                                "`{section}` answers `{key}`, item {item} of step `{id}`, which has no items (a map \
                                 step has, and a subflow step with `items`): answer `{id}` instead"
                            );
                        }
                        items.push(ItemAnswer { section, key, step: id, item });
                    }
                }
                Some(_) => bail!("`{section}` answers step `{id}`, which is not a {kinds} step"),
                None => {
                    let ids: Vec<&str> =
                        plan.steps.iter().filter(|step| fits(&step.kind)).map(|step| step.id.as_str()).collect();
                    bail!(
                        "`{section}` answers step `{id}`, which flow {} does not have; its {kinds} steps: {}",
                        plan.name,
                        ids.join(", ")
                    )
                }
            }
            let answers = match section {
                "tasks" => &case.tasks[key],
                "subflows" => &case.subflows[key],
                _ => continue,
            };
            for (nth, answer) in answers.0.iter().enumerate() {
                if let Some(problem) = answer_problem(answer, limits) {
                    let which = if answers.0.len() == 1 { "the answer".to_owned() } else { format!("answer {nth}") };
                    bail!("`{section}`: {which} for `{key}` {problem}");
                }
            }
        }
    }
    Ok(items)
}

/// A key of `tasks` or `subflows`: a step id, or `id[N]` for item N of the step (N an
/// index from 0, written as the grid writes it: `m[1]`, not `m[01]`).
fn parse_key(key: &str) -> Result<(&str, Option<u32>), String> {
    let Some((id, rest)) = key.split_once('[') else { return Ok((key, None)) };
    let item = rest.strip_suffix(']').and_then(|index| index.parse::<u32>().ok().filter(|n| n.to_string() == index));
    match item {
        Some(item) => Ok((id, Some(item))),
        None => Err(format!(
            "is neither a step id nor `step[N]`, an item of the step by its index (from 0, without leading zeros: \
             `{id}[2]`)"
        )),
    }
}

/// Whether a step runs per item, so that `step[N]` can answer one of them.
fn has_items(kind: &PlanStepKind) -> bool {
    match kind {
        PlanStepKind::Map { .. } => true,
        PlanStepKind::Subflow(spec) => spec.items.is_some(),
        _ => false,
    }
}

/// What is wrong with an answer the grid would not take from a worker (or a child run),
/// if anything: it gives exactly one of `output`, `error` and `echo: true`; an error's code
/// passes the grid's check of a worker's error (not blank, at most
/// [`Limits::name_bytes_max`] bytes, no control characters), and an output nests no deeper
/// than [`Limits::nesting_depth_max`]. The grid fails an attempt that answers otherwise
/// with `invalid_output`, so the case would test a run other than the grid's.
fn answer_problem(answer: &Answer, limits: &Limits) -> Option<String> {
    let given: Vec<&str> =
        [(answer.output.is_some(), "`output`"), (answer.error.is_some(), "`error`"), (answer.echo, "`echo: true`")]
            .into_iter()
            .filter_map(|(given, name)| given.then_some(name))
            .collect();
    if given.is_empty() {
        return Some(
            "gives none of `output`, `error` and `echo: true`: an answer gives exactly one of them".to_owned(),
        );
    }
    if given.len() > 1 {
        return Some(format!(
            "gives {}: an answer gives exactly one of `output`, `error` and `echo: true`, as a worker sends an \
             output or an error, not both",
            given.join(" and ")
        ));
    }
    if let Some(error) = &answer.error {
        match limits.error_code_problem(&error.code) {
            Some(ErrorCodeProblem::Blank) => {
                return Some("has a blank error code: retries and catches match an error by its code".to_owned())
            }
            Some(ErrorCodeProblem::NotTaken) => {
                return Some(format!(
                    "has an error code the grid does not take (at most {} bytes, no control characters): {:?}",
                    limits.name_bytes_max, error.code
                ))
            }
            None => {}
        }
    }
    let depth = answer.output.as_ref().map_or(0, nesting_depth);
    (depth > limits.nesting_depth_max).then(|| {
        format!(
            "has an output nested {depth} levels deep, over the limit of {} the grid takes",
            limits.nesting_depth_max
        )
    })
}

/// Refuses a run input or signal data (`what`) the grid's API would refuse: nested deeper
/// than [`Limits::nesting_depth_max`], or over [`Limits::payload_bytes_max`] as
/// MessagePack, the encoding the API measures it in.
fn check_payload(what: &str, value: &Value, limits: &Limits) -> anyhow::Result<()> {
    let depth = nesting_depth(value);
    if depth > limits.nesting_depth_max {
        bail!(
            "the grid would refuse {what}: it is nested {depth} levels deep, over the limit of {}",
            limits.nesting_depth_max
        );
    }
    let size = msgpack_bytes(value);
    if size > limits.payload_bytes_max {
        bail!(
            "the grid would refuse {what}: it is {size} bytes (as MessagePack), over the limit of {} bytes",
            limits.payload_bytes_max
        );
    }
    Ok(())
}

/// Refuses an answer given to an item the run never asked for (`asked`): item N of the
/// step was never dispatched (items count from 0), so the case tests other than it says.
fn check_items_asked(items: &[ItemAnswer], asked: &Asked) -> anyhow::Result<()> {
    for answer in items {
        if asked.contains_key(&(answer.step.to_owned(), Some(answer.item))) {
            continue;
        }
        let going = asked.keys().filter(|(step, item)| step == answer.step && item.is_some()).count();
        bail!(
            "`{}` answers `{}`, but the run never asked for item {} of step `{}` (items count from 0; it asked for \
             {going} of its items)",
            answer.section,
            answer.key,
            answer.item,
            answer.step
        );
    }
    Ok(())
}

/// Plays one case to the run's end; its view, or why it could not end (and in `partial`
/// the run as far as it went, if it started).
fn play(
    plan: &Arc<FlowPlan>,
    evaluator: &Evaluator,
    case: &Case,
    partial: &mut Option<RunView>,
) -> anyhow::Result<Played> {
    let limits = Limits::default();
    let items = check_answers(plan, case, &limits)?;
    check_payload("this input", &case.input, &limits)?;
    let mut signals: Vec<_> = case.signals.iter().collect();
    signals.sort_by_key(|(step, _)| *step);
    for (step, data) in signals {
        check_payload(&format!("the data of signal step `{step}`"), data, &limits)?;
    }
    if let Some(schema) = &plan.input_schema {
        let issues: Vec<String> = schema.check(&case.input, "input").iter().map(ToString::to_string).collect();
        if !issues.is_empty() {
            bail!(
                "the grid would refuse this input, which does not match the flow's input_schema: {}",
                issues.join("; ")
            );
        }
    }
    let run_id = RunId("test-run".into());
    let now = now_ms();
    let mut effects = Vec::new();
    let start =
        RunStart { run_id, input: case.input.clone(), labels: Labels::new(), now, queued: false, start_at: None };
    let mut run = Run::start(Arc::clone(plan), evaluator, start, &mut effects);
    let mut asked = Asked::new();
    match drive(&mut run, evaluator, case, effects, now, &mut asked) {
        Ok(handler) => match check_items_asked(&items, &asked) {
            Ok(()) => Ok(Played { view: run.view(), handler }),
            Err(error) => {
                *partial = Some(run.view());
                Err(error)
            }
        },
        Err(error) => {
            *partial = Some(run.view());
            Err(error)
        }
    }
}

/// Applies the case's answers to what the run asks for until it ends; the failure handler
/// its end starts, if any. `attempts` counts what the run asked for, by step and item.
fn drive(
    run: &mut Run,
    evaluator: &Evaluator,
    case: &Case,
    mut effects: Vec<Effect>,
    mut now: Millis,
    attempts: &mut Asked,
) -> anyhow::Result<Option<HandlerStart>> {
    let mut timers: BTreeSet<(Millis, flowgrid_engine::TimerKey)> = BTreeSet::new();
    let mut events: VecDeque<Event> = VecDeque::new();
    let mut signalled: BTreeSet<String> = BTreeSet::new();
    let mut handler = None;
    let mut applied = 0;
    loop {
        for effect in effects.drain(..) {
            match effect {
                Effect::Dispatch(dispatch) => {
                    let answers = answers_for(&case.tasks, &dispatch.attempt.step, dispatch.attempt.item)
                        .with_context(|| {
                            format!(
                                "task step `{}` was dispatched, and the case gives it no result under `tasks`",
                                dispatch.attempt.step
                            )
                        })?;
                    let nth = attempts.entry((dispatch.attempt.step.clone(), dispatch.attempt.item)).or_default();
                    events.push_back(task_event(dispatch.attempt, answers.nth(*nth), &dispatch.input));
                    *nth += 1;
                }
                Effect::StartChild(start) => {
                    let answers = answers_for(&case.subflows, &start.step, start.item).with_context(|| {
                        format!(
                            "subflow step `{}` started a child run, and the case gives no end under `subflows`",
                            start.step
                        )
                    })?;
                    let nth = attempts.entry((start.step.clone(), start.item)).or_default();
                    let answer = answers.nth(*nth);
                    *nth += 1;
                    let (status, output, error) = match &answer.error {
                        Some(error) => (RunStatus::Failed, None, Some(task_error(error))),
                        None => (RunStatus::Succeeded, Some(answer_output(answer, &start.input)), None),
                    };
                    events.push_back(Event::ChildEnded {
                        step: start.step,
                        item: start.item,
                        child: start.child,
                        status,
                        output,
                        error,
                        refused: false,
                        keeps_round: false,
                    });
                }
                Effect::ArmTimer { timer, due_ms, .. } => {
                    timers.insert((due_ms, timer));
                }
                Effect::CancelTimer { timer, due_ms, .. } => {
                    timers.remove(&(due_ms, timer));
                }
                Effect::StartFailureHandler(start) => handler = Some(start),
                // A case plays without the task cache: every attempt takes the case's answer.
                Effect::CancelChild { .. } | Effect::RunFinished { .. } | Effect::CacheResult { .. } => {}
            }
        }
        if run.status().is_terminal() {
            return Ok(handler);
        }
        if events.is_empty() {
            for step in run.view().steps {
                let waits = step.kind == "signal" && step.status == StepStatus::Running;
                if let (true, Some(data)) = (waits && !signalled.contains(&step.id), case.signals.get(&step.id)) {
                    signalled.insert(step.id.clone());
                    events.push_back(Event::SignalReceived { step: step.id, data: data.clone(), id: None });
                }
            }
        }
        let event = match events.pop_front() {
            Some(event) => {
                now += 1;
                event
            }
            None => {
                let Some((due_ms, timer)) = timers.pop_first() else {
                    let waiting: Vec<String> = run
                        .view()
                        .steps
                        .iter()
                        .filter(|step| step.status == StepStatus::Running)
                        .map(|step| format!("`{}` ({})", step.id, step.kind))
                        .collect();
                    bail!(
                        "the run waits for nothing the case gives: steps {} are running (give a signal step its data \
                         under `signals`)",
                        waiting.join(", ")
                    );
                };
                now = now.max(due_ms);
                Event::TimerFired { timer }
            }
        };
        applied += 1;
        if applied > EVENTS_MAX {
            bail!("the run took more than {EVENTS_MAX} events without ending: does a loop or a retry never end?");
        }
        if let Applied::Ignored(_) = run.apply(evaluator, now, &event, &mut effects) {
            effects.clear();
        }
    }
}

/// The answers for step `step` (item `item`): those given for `step[item]`, else for `step`.
fn answers_for<'a>(answers: &'a HashMap<String, Answers>, step: &str, item: Option<u32>) -> Option<&'a Answers> {
    item.and_then(|item| answers.get(&format!("{step}[{item}]"))).or_else(|| answers.get(step))
}

/// The steps of a run that ran to an end: succeeded or failed.
fn steps_ended(view: &RunView) -> impl Iterator<Item = String> + '_ {
    let ended = view.steps.iter().filter(|step| matches!(step.status, StepStatus::Succeeded | StepStatus::Failed));
    ended.map(|step| step.id.clone())
}

fn task_event(attempt: AttemptId, answer: &Answer, input: &Value) -> Event {
    match &answer.error {
        Some(error) => Event::TaskFailed { attempt, error: task_error(error) },
        None => Event::TaskSucceeded { attempt, output: answer_output(answer, input) },
    }
}

fn answer_output(answer: &Answer, input: &Value) -> Value {
    match (&answer.output, answer.echo) {
        (_, true) => input.clone(),
        (Some(output), false) => output.clone(),
        (None, false) => Value::Null,
    }
}

fn task_error(error: &CaseError) -> TaskError {
    TaskError { code: error.code.clone(), message: error.message.clone(), retryable: error.retryable }
}

/// Every way the run's end differs from `expect`.
fn judge(expect: &Expect, played: &Played) -> Vec<String> {
    let view = &played.view;
    let mut problems = Vec::new();
    if let Some(status) = expect.status.filter(|status| *status != view.status) {
        problems.push(format!("expected the run to end {}, it ended {}", status.as_str(), view.status.as_str()));
    }
    let output_differs = |output: &&Value| match &view.output {
        Some(got) => got != *output,
        None => !output.is_null(),
    };
    if let Some(output) = expect.output.as_ref().filter(output_differs) {
        let got = view.output.as_ref().map_or("none".to_owned(), Value::to_string);
        problems.push(format!("expected the output {output}, got {got}"));
    }
    if let Some(code) = &expect.error {
        let got = view.error.as_ref().map(|error| error.code.as_str());
        if got != Some(code.as_str()) {
            problems.push(format!("expected the error code `{code}`, got {}", got.unwrap_or("no error")));
        }
    }
    let mut steps: Vec<_> = expect.steps.iter().collect();
    steps.sort_by_key(|(id, _)| *id);
    for (id, status) in steps {
        match view.steps.iter().find(|step| step.id == *id) {
            None => problems.push(format!("expected step `{id}`, which the flow does not have")),
            Some(step) if step.status != *status => {
                problems.push(format!("expected step `{id}` to be {}, it is {}", status.as_str(), step.status.as_str()))
            }
            Some(_) => {}
        }
    }
    let handler_input = played.handler.as_ref().map(|handler| &handler.input);
    match (&expect.on_failure, handler_input) {
        (None, _) | (Some(Value::Null), None) => {}
        (Some(Value::Null), Some(got)) => {
            problems.push(format!("expected no failure handler, it starts one with {got}"))
        }
        (Some(expected), None) => {
            problems.push(format!("expected the failure handler to start with {expected}, it does not start"))
        }
        (Some(expected), Some(got)) if expected != got => {
            problems.push(format!("expected the failure handler to start with {expected}, it starts with {got}"))
        }
        (Some(_), Some(_)) => {}
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> Arc<FlowPlan> {
        let limits = Limits::default();
        let definition = parse_definition(yaml, &limits).expect("a definition");
        Arc::new(FlowPlan::compile(definition, 1, &Evaluator::new(&limits), &limits).expect("a valid flow"))
    }

    fn play_case(flow: &str, case: &str) -> anyhow::Result<RunView> {
        play_whole_case(flow, case).map(|played| played.view)
    }

    fn play_whole_case(flow: &str, case: &str) -> anyhow::Result<Played> {
        let case: Case = serde_norway::from_str(case).expect("a case");
        play(&plan(flow), &Evaluator::new(&Limits::default()), &case, &mut None)
    }

    /// Every case of the bundled examples (`<flow>.<case>.yaml`) passes against its flow.
    #[test]
    fn the_bundled_cases_pass() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
        let mut cases: Vec<PathBuf> = std::fs::read_dir(format!("{root}/flow-tests"))
            .expect("the bundled cases")
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        cases.sort();
        assert!(cases.len() >= 4, "{cases:?}");
        let limits = Limits::default();
        let evaluator = Evaluator::new(&limits);
        for path in cases {
            let name = path.file_name().and_then(|name| name.to_str()).expect("a file name");
            let flow = name.split('.').next().expect("the flow's name");
            let definition = std::fs::read_to_string(format!("{root}/flows/{flow}.yaml")).expect("its flow");
            let case: Case = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).expect("a case");
            let played = play(&plan(&definition), &evaluator, &case, &mut None)
                .unwrap_or_else(|error| panic!("{name}: {error:#}"));
            let problems = judge(case.expect.as_ref().expect("every bundled case expects"), &played);
            assert!(problems.is_empty(), "{name}: {problems:?}");
        }
    }

    /// `expect: {output: null}` is checked like any other output, not taken for no
    /// expectation at all.
    #[test]
    fn an_expected_null_output_is_checked() {
        let flow = "name: f\nsteps:\n  - {id: t, kind: transform, output: '#{a: 1}'}\n";
        let played = play_whole_case(flow, "input: {}\n").expect("the run ends");
        let expect = |yaml: &str| serde_norway::from_str::<Case>(yaml).expect("a case").expect.expect("expects");
        let problems = judge(&expect("expect: {output: null}\n"), &played);
        assert_eq!(problems, ["expected the output null, got {\"t\":{\"a\":1}}"], "{problems:?}");
        assert!(judge(&expect("expect: {output: {t: {a: 1}}}\n"), &played).is_empty());
        assert!(judge(&expect("expect: {status: succeeded}\n"), &played).is_empty(), "no output expected");
    }

    #[test]
    fn answers_go_one_per_attempt_and_items_echo_their_own_input() {
        let flow = r#"
name: f
steps:
  - { id: a, kind: task, pool: p, task: t, retry: { max_attempts: 3, initial_backoff_ms: 60000, max_backoff_ms: 60000, jitter: 0 } }
  - { id: m, kind: map, after: [a], items: 'input.xs', pool: p, task: t, input: '#{ x: item }' }
"#;
        let case = "input: {xs: [1, 2]}\ntasks:\n  a: [{error: {code: busy}}, {output: 7}]\n  m: {echo: true}\n";
        let view = play_case(flow, case).expect("the run ends");
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
        let a = view.steps.iter().find(|step| step.id == "a").unwrap();
        assert_eq!((a.attempts, a.output.clone()), (2, Some(json!(7))));
        assert!(view.ended_ms.unwrap() - view.created_ms >= 60_000, "the backoff passed on the case's clock");
        let m = view.steps.iter().find(|step| step.id == "m").unwrap();
        assert_eq!(m.output, Some(json!([{"x": 1}, {"x": 2}])));
        let one_fails = format!("{case}  m[1]: {{error: {{code: broken, retryable: false}}}}\n");
        let failed = play_case(flow, &one_fails).expect("the run ends");
        assert_eq!(failed.error.map(|error| error.code), Some("map_failed".to_owned()), "item 1's own answer");
    }

    #[test]
    fn an_answer_for_a_step_the_flow_does_not_have_is_refused_naming_the_ones_it_has() {
        let flow =
            "name: f\nsteps:\n  - {id: a, kind: task, pool: p, task: t}\n  - {id: w, kind: signal, after: [a]}\n";
        let error = play_case(flow, "tasks: {a: {output: 1}, aa: {output: 2}}\n").unwrap_err().to_string();
        assert!(
            error.contains("`tasks` answers step `aa`, which flow f does not have; its task or map steps: a"),
            "{error}"
        );
        let error = play_case(flow, "tasks: {w: {output: 1}}\n").unwrap_err().to_string();
        assert!(error.contains("`tasks` answers step `w`, which is not a task or map step"), "{error}");
        let error = play_case(flow, "tasks: {a: {output: 1}}\nsignals: {x: 1}\n").unwrap_err().to_string();
        assert!(error.contains("`signals` answers step `x`"), "{error}");
    }

    #[test]
    fn a_case_that_leaves_the_run_waiting_says_what_it_misses() {
        let flow = "name: f\nsteps:\n  - { id: a, kind: task, pool: p, task: t }\n";
        let error = play_case(flow, "input: 1\n").expect_err("no answer for `a`").to_string();
        assert!(error.contains("task step `a` was dispatched") && error.contains("under `tasks`"), "{error}");
        let flow = "name: f\nsteps:\n  - { id: ok, kind: signal }\n";
        let error = play_case(flow, "input: 1\n").expect_err("no data for `ok`").to_string();
        assert!(error.contains("`ok` (signal)") && error.contains("under `signals`"), "{error}");
        let view = play_case(flow, "signals: {ok: {yes: true}}\n").expect("the signal ends it");
        assert_eq!(view.output, Some(json!({"ok": {"yes": true}})));
    }

    #[test]
    fn the_steps_a_case_ran_to_an_end_are_those_that_succeeded_or_failed() {
        let flow = r#"
name: f
steps:
  - { id: a, kind: task, pool: p, task: t, catch: [{ errors: [bad], next: fix }] }
  - { id: b, kind: task, pool: p, task: t, after: [a] }
  - { id: fix, kind: transform, output: '1' }
"#;
        let view = play_case(flow, "tasks: {a: {output: 1}, b: {output: 2}}\n").expect("it ends");
        assert_eq!(steps_ended(&view).collect::<Vec<_>>(), ["a", "b"], "the catch's step never ran");
        let view = play_case(flow, "tasks: {a: {error: {code: bad}}}\n").expect("it ends");
        assert_eq!(steps_ended(&view).collect::<Vec<_>>(), ["a", "fix"]);
    }

    #[test]
    fn the_command_exits_1_when_a_case_fails_and_0_when_all_pass() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let flow = write("f.yaml", "name: f\nsteps:\n  - { id: a, kind: task, pool: p, task: t }\n");
        let good = write("good.yaml", "tasks: {a: {output: 1}}\nexpect: {output: {a: 1}}\n");
        let bad = write("bad.yaml", "tasks: {a: {output: 1}}\nexpect: {status: failed}\n");
        let session = Session {
            nats_url: String::new(),
            nats_options: Default::default(),
            prefix: "flowgrid".into(),
            json: true,
        };
        assert_eq!(test(&flow, std::slice::from_ref(&good), &session).unwrap(), ExitCode::SUCCESS);
        assert_eq!(test(&flow, &[good, bad], &session).unwrap(), ExitCode::FAILURE);
        let broken = write("broken.yaml", "tasks: {a: {output: 1, eror: {}}}\n");
        let error = test(&flow, &[broken], &session).unwrap_err();
        assert!(format!("{error:#}").contains("not a test case"), "{error:#}");
    }

    #[test]
    fn expectations_name_every_difference() {
        let flow = "name: f\nsteps:\n  - { id: a, kind: task, pool: p, task: t }\n";
        let played = play_whole_case(flow, "tasks: {a: {output: 1}}\n").expect("it ends");
        let expect = Expect {
            status: Some(RunStatus::Failed),
            output: Some(json!({"a": 2})),
            error: Some("boom".into()),
            steps: HashMap::from([("a".into(), StepStatus::Failed), ("zz".into(), StepStatus::Skipped)]),
            on_failure: Some(json!({"x": 1})),
        };
        let problems = judge(&expect, &played);
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert!(problems[0].contains("expected the run to end failed, it ended succeeded"), "{problems:?}");
        assert!(problems[5].contains("expected the failure handler to start with {\"x\":1}, it does not start"));
        assert!(judge(&Expect::default(), &played).is_empty());
    }

    #[test]
    fn a_case_checks_the_input_its_failure_handler_starts_with() {
        let flow = r#"
name: f
on_failure: { flow: undo, input: '#{ order: input.order, why: result.error.code }' }
steps:
  - { id: a, kind: task, pool: p, task: t, retry: { max_attempts: 1 } }
"#;
        let failing = "input: {order: 7}\ntasks: {a: {error: {code: declined}}}\n";
        let played = play_whole_case(flow, failing).expect("it ends");
        let handler = played.handler.as_ref().expect("the handler starts");
        assert_eq!((handler.flow.as_str(), &handler.input), ("undo", &json!({"order": 7, "why": "declined"})));
        let case: Case =
            serde_norway::from_str(&format!("{failing}expect: {{on_failure: {{order: 7, why: declined}}}}\n")).unwrap();
        assert!(judge(case.expect.as_ref().unwrap(), &played).is_empty());
        let case: Case = serde_norway::from_str(&format!("{failing}expect: {{on_failure: null}}\n")).unwrap();
        let problems = judge(case.expect.as_ref().unwrap(), &played);
        assert!(problems[0].starts_with("expected no failure handler, it starts one with"), "{problems:?}");
        // A run that succeeds starts no handler, as `on_failure: null` says.
        let succeeding = play_whole_case(flow, "tasks: {a: {output: 1}}\n").expect("it ends");
        assert!(succeeding.handler.is_none());
        assert!(judge(case.expect.as_ref().unwrap(), &succeeding).is_empty());
    }

    /// `depth` arrays, one in the other, as YAML.
    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn an_answer_input_or_signal_the_grid_would_not_take_is_refused_naming_its_step() {
        let flow =
            "name: f\nsteps:\n  - {id: a, kind: task, pool: p, task: t}\n  - {id: w, kind: signal, after: [a]}\n";
        let depth_max = Limits::default().nesting_depth_max;
        let refused = |case: String, expected: &[&str]| {
            let error = format!("{:#}", play_case(flow, &case).expect_err(&case));
            assert!(expected.iter().all(|part| error.contains(part)), "{case}: {error}");
        };
        let both = "`tasks`: the answer for `a` gives `output` and `error`: an answer gives exactly one of";
        refused("tasks: {a: {output: 1, error: {code: x}}}\n".into(), &[both]);
        refused("tasks: {a: {echo: true, output: 5}}\n".into(), &["for `a` gives `output` and `echo: true`"]);
        refused("tasks: {a: {}}\n".into(), &["for `a` gives none of `output`, `error` and `echo: true`"]);
        refused("tasks: {a: {error: {code: ''}}}\n".into(), &["for `a` has a blank error code"]);
        refused("tasks: {a: {error: {code: \"a\\tb\"}}}\n".into(), &["for `a` has an error code the grid does not"]);
        refused(format!("tasks: {{a: {{error: {{code: {}}}}}}}\n", "c".repeat(129)), &["(at most 128 bytes"]);
        let deep = nested(depth_max + 1);
        let too_deep = format!("has an output nested {} levels deep, over the limit of {depth_max}", depth_max + 1);
        refused(format!("tasks: {{a: [{{output: 1}}, {{output: {deep}}}]}}\n"), &["answer 1 for `a`", &too_deep]);
        let input_deep = format!("the grid would refuse this input: it is nested {} levels deep", depth_max + 1);
        refused(format!("input: {deep}\ntasks: {{a: {{output: 1}}}}\n"), &[&input_deep]);
        let large = "x".repeat(Limits::default().payload_bytes_max);
        refused(format!("input: {large}\ntasks: {{a: {{output: 1}}}}\n"), &["this input: it is 1048581 bytes"]);
        let signal = format!("tasks: {{a: {{output: 1}}}}\nsignals: {{w: {deep}}}\n");
        refused(signal, &["the grid would refuse the data of signal step `w`: it is nested"]);
        // As deep as the grid takes, and a null output, are answers.
        let deepest = nested(depth_max);
        let view = play_case(flow, &format!("tasks: {{a: {{output: null}}}}\nsignals: {{w: {deepest}}}\n")).unwrap();
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
        assert!(play_case(
            flow,
            &format!("input: {deepest}\ntasks: {{a: {{output: {deepest}}}}}\nsignals: {{w: 1}}\n")
        )
        .is_ok());
    }

    #[test]
    fn an_answer_for_an_item_is_refused_unless_the_step_has_items_and_the_run_asks_for_it() {
        let task = "name: f\nsteps:\n  - {id: a, kind: task, pool: p, task: t}\n";
        let error = format!("{:#}", play_case(task, "tasks: {a: {output: 1}, \"a[2]\": {output: 2}}\n").unwrap_err());
        assert!(error.contains("`tasks` answers `a[2]`, item 2 of step `a`, which has no items"), "{error}");
        let map = "name: f\nsteps:\n  - {id: m, kind: map, items: 'input', pool: p, task: t}\n";
        let case = |key: &str| format!("input: [1, 2, 3]\ntasks: {{m: {{output: 1}}, \"{key}\": {{output: 2}}}}\n");
        for key in ["m[01]", "m[1", "m[+1]", "m[]", "m[-1]"] {
            let error = format!("{:#}", play_case(map, &case(key)).unwrap_err());
            assert!(error.contains(&format!("`tasks` key `{key}` is neither a step id nor `step[N]`")), "{error}");
        }
        // Item 3 of 3 is never dispatched: items count from 0.
        let error = format!("{:#}", play_case(map, &case("m[3]")).unwrap_err());
        let never = "`tasks` answers `m[3]`, but the run never asked for item 3 of step `m` (items count from 0; it \
                     asked for 3 of its items)";
        assert!(error.contains(never), "{error}");
        let view = play_case(map, &case("m[2]")).expect("item 2 is answered");
        assert_eq!(view.output, Some(json!({"m": [1, 1, 2]})));
        // A subflow step has items only with `items`.
        let subflows = "name: f\nsteps:\n  - {id: s, kind: subflow, flow: g, items: 'input'}\n  \
                        - {id: one, kind: subflow, flow: g, after: [s]}\n";
        let case = "input: [1, 2]\nsubflows: {s: {output: 1}, \"s[1]\": {output: 2}, one: {output: 3}}\n";
        let view = play_case(subflows, case).expect("item 1 is answered");
        assert_eq!(
            view.steps.iter().find(|step| step.id == "s").and_then(|step| step.output.clone()),
            Some(json!([1, 2]))
        );
        let case = "input: [1, 2]\nsubflows: {s: {output: 1}, one: {output: 3}, \"one[0]\": {output: 4}}\n";
        let error = format!("{:#}", play_case(subflows, case).unwrap_err());
        assert!(error.contains("`subflows` answers `one[0]`, item 0 of step `one`, which has no items"), "{error}");
    }

    #[test]
    fn a_case_that_cannot_end_keeps_the_steps_that_ran() {
        let flow = "name: f\nsteps:\n  - { kind: transform, id: pre, output: '1' }\n  \
                    - { kind: signal, id: approve, after: [pre] }\n";
        let case: Case = serde_norway::from_str("input: {}\n").expect("a case");
        let mut partial = None;
        let Err(error) = play(&plan(flow), &Evaluator::new(&Limits::default()), &case, &mut partial) else {
            panic!("the case cannot end")
        };
        assert!(error.to_string().contains("waits for nothing the case gives"), "{error:#}");
        let view = partial.expect("the run as far as it went");
        assert_eq!(steps_ended(&view).collect::<Vec<_>>(), ["pre"]);
    }
}
