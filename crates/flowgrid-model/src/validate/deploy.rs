//! Rules a definition must meet to be deployed now, on top of those [`super::validate`]
//! applies. They were added after versions that break them could be deployed; such a
//! version keeps running (its shard reloads it with the older rules alone), so these are
//! checked only where a definition comes in: a deploy and `flow check`.

use crate::definition::{FlowDefinition, RetryPolicy, Step};
use crate::error::{DefinitionError, Issue, Result};
use crate::expr::Evaluator;
use crate::limits::{Limits, CHILDREN_GOING_MAX, CHILDREN_GOING_RUN_MAX, DURATION_MS_MAX, MAP_ITEMS_GOING_MAX};

use super::{push_issue, step_path};

/// Checks `definition` against the rules for new deployments; lists every problem.
pub fn check_new(definition: &FlowDefinition, evaluator: &Evaluator, limits: &Limits) -> Result<()> {
    let mut issues = Vec::new();
    super::expressions::check_variables(definition, evaluator, &mut issues);
    check_schedule_input(definition, limits, &mut issues);
    check_durations(definition, &mut issues);
    check_implicit_edges_listed(&definition.steps, &mut issues);
    check_trigger_stream_length(definition, &mut issues);
    check_going(definition, &mut issues);
    if issues.is_empty() {
        Ok(())
    } else {
        Err(DefinitionError::Invalid(issues))
    }
}

/// A schedule's input fits what a start may carry as the API measures it, as MessagePack
/// (each slot starts through the API): one that fits as JSON may not (a float takes 9
/// bytes of it), and then every slot was refused.
fn check_schedule_input(definition: &FlowDefinition, limits: &Limits, issues: &mut Vec<Issue>) {
    let Some(schedule) = &definition.schedule else { return };
    let bytes = crate::limits::msgpack_bytes(&schedule.input);
    if bytes > limits.payload_bytes_max {
        push_issue(
            issues,
            "schedule.input",
            format!(
                "is {bytes} bytes as MessagePack (as the API measures a start's input), over the limit of {}: pass a \
                 reference to large data",
                limits.payload_bytes_max
            ),
        );
    }
}

/// The longest trigger stream name, in bytes: a trigger's runs are keyed
/// `trigger/<stream>/<stream created, Unix ns>/<sequence>` (up to 50 bytes besides the
/// name), within the 256 bytes an idempotency key may take. With a longer name every
/// message of the stream was refused, and no run started.
pub const TRIGGER_STREAM_BYTES_MAX: usize = 200;

fn check_trigger_stream_length(definition: &FlowDefinition, issues: &mut Vec<Issue>) {
    let Some(trigger) = &definition.trigger else { return };
    if trigger.stream.len() > TRIGGER_STREAM_BYTES_MAX {
        let message = format!(
            "is {} bytes, over the {TRIGGER_STREAM_BYTES_MAX} a trigger's stream name may take (its runs' keys \
             hold it): use a shorter stream name",
            trigger.stream.len()
        );
        push_issue(issues, "trigger.stream", message);
    }
}

/// A subflow step with `items` has at most [`CHILDREN_GOING_MAX`] children going at once, a
/// run at most [`CHILDREN_GOING_RUN_MAX`] over all its subflow steps, and a map step at
/// most [`MAP_ITEMS_GOING_MAX`] items in flight.
fn check_going(definition: &FlowDefinition, issues: &mut Vec<Issue>) {
    let children: u64 = definition
        .steps
        .iter()
        .map(|step| match step {
            Step::Subflow(subflow) if subflow.items.is_some() => {
                u64::from(subflow.max_concurrency.unwrap_or(CHILDREN_GOING_MAX).min(CHILDREN_GOING_MAX))
            }
            Step::Subflow(_) => 1,
            _ => 0,
        })
        .sum();
    if children > u64::from(CHILDREN_GOING_RUN_MAX) {
        push_issue(
            issues,
            "steps",
            format!(
                "its subflow steps may have {children} child runs going at once (a step with `items` \
                 {CHILDREN_GOING_MAX} unless its `max_concurrency` says fewer), over the {CHILDREN_GOING_RUN_MAX} a run \
                 may have (a run that ends cancels them all in one commit): give steps with `items` a lower \
                 `max_concurrency`"
            ),
        );
    }
    for (position, step) in definition.steps.iter().enumerate() {
        let (max_concurrency, going_max, why) = match step {
            Step::Subflow(subflow) => (
                subflow.max_concurrency,
                CHILDREN_GOING_MAX,
                "child runs a step may have going at once (a parent that ends cancels them all in one commit): use \
                 at most that, or split the items over child flows that fan out themselves",
            ),
            Step::Map(map) => (
                map.max_concurrency,
                MAP_ITEMS_GOING_MAX,
                "items a map step may have in flight at once (its start dispatches them in one turn of its shard): \
                 use at most that; the items past it go as the first ones end",
            ),
            _ => continue,
        };
        if let Some(max_concurrency) = max_concurrency.filter(|&going| going > going_max) {
            push_issue(
                issues,
                format!("{}.max_concurrency", step_path(position, step.id())),
                format!("is {max_concurrency}, over the {going_max} {why}"),
            );
        }
    }
}

/// Every time a run may wait for (a timeout, a retry's backoff) is at most
/// [`DURATION_MS_MAX`], as a `wait` is: a longer one (up to the end of time, where the
/// deadline saturates) holds the run and its place among the active runs for as long.
fn check_durations(definition: &FlowDefinition, issues: &mut Vec<Issue>) {
    let mut durations = vec![("timeout_ms".to_owned(), definition.timeout_ms)];
    for (position, step) in definition.steps.iter().enumerate() {
        let path = step_path(position, step.id());
        match step {
            Step::Task(task) => {
                worker_durations(&path, task.timeout_ms, task.total_timeout_ms, &task.retry, &mut durations)
            }
            Step::Map(map) => worker_durations(&path, map.timeout_ms, map.total_timeout_ms, &map.retry, &mut durations),
            Step::Signal(signal) => durations.push((format!("{path}.timeout_ms"), signal.timeout_ms)),
            Step::Subflow(subflow) => durations.push((format!("{path}.timeout_ms"), subflow.timeout_ms)),
            _ => {}
        }
    }
    for (path, duration_ms) in durations {
        if let Some(duration_ms) = duration_ms.filter(|&duration_ms| duration_ms > DURATION_MS_MAX) {
            push_issue(
                issues,
                path,
                format!(
                    "is {duration_ms} ms, over the longest a run may wait of {DURATION_MS_MAX} ms (366 days): use at \
                     most that"
                ),
            );
        }
    }
}

/// The times a worker step may wait for, with their paths.
fn worker_durations(
    path: &str,
    timeout_ms: Option<u64>,
    total_timeout_ms: Option<u64>,
    retry: &RetryPolicy,
    durations: &mut Vec<(String, Option<u64>)>,
) {
    durations.push((format!("{path}.timeout_ms"), timeout_ms));
    durations.push((format!("{path}.total_timeout_ms"), total_timeout_ms));
    durations.push((format!("{path}.retry.initial_backoff_ms"), Some(retry.initial_backoff_ms)));
    durations.push((format!("{path}.retry.max_backoff_ms"), Some(retry.max_backoff_ms)));
}

/// A step whose `after` names a choice that branches to it: that edge is implicit, and
/// listed in `after` as well it makes the step run whichever way the choice went. (A catch
/// target that lists the caught step in `after` also runs when that step succeeds, which
/// an author may mean: it stays allowed.)
fn check_implicit_edges_listed(steps: &[Step], issues: &mut Vec<Issue>) {
    for (position, step) in steps.iter().enumerate() {
        for (entry, after) in step.after().iter().enumerate() {
            let Some(Step::Choice(choice)) = steps.iter().find(|source| source.id() == after) else { continue };
            let branches_here = choice.choices.iter().any(|rule| rule.next == step.id())
                || choice.default.as_deref() == Some(step.id());
            if branches_here {
                push_issue(
                    issues,
                    format!("{}.after[{entry}]", step_path(position, step.id())),
                    format!(
                        "lists `{after}`, which branches to this step: a branch's step runs when its branch is taken, \
                         and listed in `after` as well it would run whichever way `{after}` went; remove `{after}` \
                         from `after`"
                    ),
                );
            }
        }
    }
}
