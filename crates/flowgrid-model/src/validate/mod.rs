//! Parsing, validation and compilation of flow definitions.
//!
//! Invariants:
//! - [`validate`] reports every problem it finds, each located by a path such as
//!   `steps[3](resize).retry.max_attempts`, never only the first one.
//! - A definition that passes [`validate`] has unique step ids, edges that all name
//!   existing other steps, no cycle over the full edge set (`after`, choice targets and
//!   catch targets), expressions that compile, and expressions that read only steps that
//!   run before them and only the variables their field has (`item` in a map's `input`).
//!   [`compile`] relies on all of it.
//! - Each expression is compiled once: validation keeps the compiled form for the plan.

mod deploy;
mod expressions;
mod graph;
mod rules;
mod yaml;

pub use self::rules::is_name;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use crate::definition::{
    Catch, ChoiceStep, FailStep, FlowDefinition, MapStep, SignalStep, Step, SubflowStep, SucceedStep, TaskStep,
    TransformStep, WaitStep, REPEAT_ITERATIONS_DEFAULT,
};
use crate::error::{DefinitionError, Issue, Result};

use crate::expr::Evaluator;
use crate::limits::{Limits, CHILDREN_GOING_MAX, MAP_ITEMS_GOING_MAX};
use crate::plan::{
    CatchRule, Edge, EdgeWhen, FlowItems, FlowLoop, FlowPlan, PlanCache, PlanStep, PlanStepKind, StepIndex,
    SubflowSpec, TaskSpec, WaitFor, PRIORITY_DEFAULT, TASK_TIMEOUT_MS_DEFAULT,
};
pub use deploy::check_new;

use self::expressions::ExpressionTable;
use self::graph::Graph;

/// How much more than its text a YAML definition may hold once its aliases (`*name`) are
/// expanded: without aliases its scalars and nodes add up to less than twice the text.
const YAML_EXPANSION_FACTOR: usize = 2;

/// Reads a definition from YAML or JSON (JSON when the first non-blank character is `{`).
///
/// Refuses text over `limits.definition_bytes_max` and a definition (JSON or YAML) nested
/// deeper than `limits.nesting_depth_max`. Parse errors carry the line and column and name
/// unknown fields. The result is not validated yet: call [`validate`] or [`FlowPlan::compile`].
pub fn parse_definition(text: &str, limits: &Limits) -> Result<FlowDefinition> {
    if text.len() > limits.definition_bytes_max {
        return Err(DefinitionError::Parse(format!(
            "the definition is {} bytes, over the limit of {} bytes: split the flow into smaller flows",
            text.len(),
            limits.definition_bytes_max
        )));
    }
    // Editors on Windows may start a file with a byte order mark; it is no part of the text.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('{') {
        check_json_depth(text, limits.nesting_depth_max)?;
        serde_json::from_str(text).map_err(|error| {
            let place = Some((error.line(), error.column()));
            more_parse_issues(format!("JSON: {error}"), &error.to_string(), place, serde_json::from_str(text).ok())
        })
    } else {
        yaml::check_expansion(text, YAML_EXPANSION_FACTOR * limits.definition_bytes_max)?;
        let definition = serde_norway::from_str(text).map_err(|error| {
            let place = error.location().map(|place| (place.line(), place.column()));
            more_parse_issues(format!("YAML: {error}"), &error.to_string(), place, serde_norway::from_str(text).ok())
        })?;
        check_yaml_depth(&definition, limits.nesting_depth_max)?;
        Ok(definition)
    }
}

/// Refuses a definition read from YAML whose arrays and objects nest deeper than
/// `depth_max`, as [`check_json_depth`] refuses JSON text (the definition itself counting
/// as the first level). YAML is measured once parsed, its parser stopping past 128 levels;
/// the message names the top-level field that nests too deep.
fn check_yaml_depth(definition: &FlowDefinition, depth_max: usize) -> Result<()> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(definition) else { return Ok(()) };
    let too_deep = fields.iter().find(|(_, value)| 1 + crate::limits::nesting_depth(value) > depth_max);
    match too_deep {
        Some((field, _)) => Err(DefinitionError::Parse(format!(
            "YAML: nesting deeper than the limit of {depth_max} levels in `{field}`: flatten the value"
        ))),
        None => Ok(()),
    }
}

/// A definition that does not fit the model stops the parser at its first mistake; this
/// looks for the others, so that an author fixes them all at once: each step, and the
/// flow without its steps, is read on its own from the parsed `value`, and each that does
/// not fit is an issue located by its step (`steps[2](resize).retry.max_attempts`). The
/// mistake the parser found keeps its line and column. Text that is not YAML or JSON at all
/// has the parser's error alone.
fn more_parse_issues(
    first: String,
    first_bare: &str,
    place: Option<(usize, usize)>,
    value: Option<serde_json::Value>,
) -> DefinitionError {
    let Some(serde_json::Value::Object(mut flow)) = value else { return DefinitionError::Parse(first) };
    let steps = match flow.get_mut("steps") {
        Some(serde_json::Value::Array(steps)) => std::mem::take(steps),
        _ => Vec::new(),
    };
    let mut issues = Vec::new();
    for (position, step) in steps.into_iter().enumerate() {
        let id = step.get("id").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
        if let Some((inner, message)) = step_mistake(step) {
            let path = step_path(position, &id);
            let path = if inner.is_empty() { path } else { format!("{path}.{inner}") };
            issues.push(Issue { path, message });
        }
    }
    if let Err(error) = serde_path_to_error::deserialize::<_, FlowDefinition>(serde_json::Value::Object(flow)) {
        let path = error.path().to_string();
        let path = if path == "." { "definition".to_owned() } else { path };
        issues.insert(0, Issue { path, message: error.into_inner().to_string() });
    }
    // The parser's mistake, found again here without its place: give it back its place.
    match issues.iter().position(|issue| first_bare.contains(&issue.message)) {
        None if issues.is_empty() => return DefinitionError::Parse(first),
        Some(found) => {
            if let Some((line, column)) = place {
                issues[found].message.push_str(&format!(" (line {line} column {column})"));
            }
        }
        None => issues.insert(0, Issue { path: "definition".to_owned(), message: first }),
    }
    DefinitionError::Invalid(issues)
}

/// Checks `definition` against every rule and lists all problems found as located
/// [`Issue`]s in [`DefinitionError::Invalid`].
pub fn validate(definition: &FlowDefinition, evaluator: &Evaluator, limits: &Limits) -> Result<()> {
    check(definition, evaluator, limits).map(|_| ())
}

/// Validates `definition` and builds its plan, following the edge semantics documented in
/// [`crate::plan`].
pub(crate) fn compile(
    definition: FlowDefinition,
    version: u32,
    evaluator: &Evaluator,
    limits: &Limits,
) -> Result<FlowPlan> {
    let mut expressions = check(&definition, evaluator, limits)?;
    let index: HashMap<&str, StepIndex> =
        definition.steps.iter().enumerate().map(|(position, step)| (step.id(), to_index(position))).collect();
    let graph = Graph::new(&definition.steps);
    let mut steps = Vec::with_capacity(definition.steps.len());
    for (position, step) in definition.steps.iter().enumerate() {
        let kind = plan_kind(position, step, &index, &mut expressions, limits);
        let when = expressions.take(&format!("{}.when", step_path(position, step.id())));
        steps.push(PlanStep {
            id: step.id().to_owned(),
            kind,
            when,
            deps: graph.deps(position).into_iter().map(to_index).collect(),
            outgoing: outgoing_edges(position, step, &definition.steps, &index),
        });
    }
    let output = expressions.take(expressions::FLOW_OUTPUT_PATH);
    let trigger_input = expressions.take(expressions::TRIGGER_INPUT_PATH);
    let concurrency_key = expressions.take(expressions::CONCURRENCY_KEY_PATH);
    let on_failure_input = expressions.take(expressions::ON_FAILURE_INPUT_PATH);
    Ok(FlowPlan::assemble(definition, version, steps, output, trigger_input, concurrency_key, on_failure_input))
}

/// `definition` as a deploy stores it: every map step with the `max_concurrency` it gets by
/// default ([`MAP_ITEMS_GOING_MAX`]) written in. A stored version keeps what it runs with,
/// whatever later releases default to: a run replayed from its history after an upgrade
/// dispatches what it dispatched before.
pub fn with_deploy_defaults(mut definition: FlowDefinition) -> FlowDefinition {
    for step in &mut definition.steps {
        if let Step::Map(map) = step {
            map.max_concurrency.get_or_insert(MAP_ITEMS_GOING_MAX);
        }
    }
    definition
}

fn items_max(limits: &Limits) -> u32 {
    u32::try_from(limits.map_items_max).unwrap_or(u32::MAX)
}

/// All checks; on success, the compiled expressions keyed by their path.
fn check(definition: &FlowDefinition, evaluator: &Evaluator, limits: &Limits) -> Result<ExpressionTable> {
    let mut issues = Vec::new();
    rules::check_fields(definition, limits, &mut issues);
    let graph_ok = graph::check_edges(&definition.steps, &mut issues);
    let expressions = ExpressionTable::compile(definition, evaluator, &mut issues);
    if graph_ok {
        let graph = Graph::new(&definition.steps);
        if let Some(cycle_issues) = graph.cycle_issues(&definition.steps) {
            issues.extend(cycle_issues);
        }
        expressions.check_references(definition, &graph, &mut issues);
    }
    if issues.is_empty() {
        Ok(expressions)
    } else {
        Err(DefinitionError::Invalid(issues))
    }
}

/// `steps[3](resize)`: how issues name a step.
pub(crate) fn step_path(position: usize, id: &str) -> String {
    if id.is_empty() {
        format!("steps[{position}]")
    } else {
        format!("steps[{position}]({id})")
    }
}

fn to_index(position: usize) -> StepIndex {
    StepIndex::try_from(position).expect("steps_max keeps step positions within StepIndex")
}

fn plan_kind(
    position: usize,
    step: &Step,
    index: &HashMap<&str, StepIndex>,
    expressions: &mut ExpressionTable,
    limits: &Limits,
) -> PlanStepKind {
    let path = step_path(position, step.id());
    let mut take = |field: &str| expressions.take(&format!("{path}.{field}"));
    let mut required = |field: &str| take(field).expect("validation compiled every required expression");
    match step {
        Step::Task(task) => PlanStepKind::Task(TaskSpec {
            pool: task.pool.as_str().into(),
            task: task.task.as_str().into(),
            input: take("input"),
            output: take("output"),
            retry: task.retry.clone(),
            timeout_ms: task.timeout_ms.unwrap_or(TASK_TIMEOUT_MS_DEFAULT),
            total_timeout_ms: task.total_timeout_ms,
            priority: task.priority.unwrap_or(PRIORITY_DEFAULT),
            cache: task.cache.as_ref().map(|cache| PlanCache { key: take("cache.key"), ttl_ms: cache.ttl_ms }),
            catch: catch_rules(&task.catch, index),
        }),
        Step::Map(map) => PlanStepKind::Map {
            items: required("items"),
            spec: TaskSpec {
                pool: map.pool.as_str().into(),
                task: map.task.as_str().into(),
                input: take("input"),
                output: take("output"),
                retry: map.retry.clone(),
                timeout_ms: map.timeout_ms.unwrap_or(TASK_TIMEOUT_MS_DEFAULT),
                total_timeout_ms: map.total_timeout_ms,
                priority: map.priority.unwrap_or(PRIORITY_DEFAULT),
                cache: map.cache.as_ref().map(|cache| PlanCache { key: take("cache.key"), ttl_ms: cache.ttl_ms }),
                catch: catch_rules(&map.catch, index),
            },
            // A deploy gives every map step its bound ([`with_deploy_defaults`]). A version
            // deployed before without one keeps what it had, all of its items up to the
            // limit, so that its runs replay as they ran.
            max_concurrency: map.max_concurrency.unwrap_or_else(|| items_max(limits)),
            tolerated_failures: map.tolerated_failures,
        },
        Step::Choice(choice) => PlanStepKind::Choice {
            rules: choice
                .choices
                .iter()
                .enumerate()
                .map(|(rule, choice_rule)| {
                    (required(&format!("choices[{rule}].when")), index[choice_rule.next.as_str()])
                })
                .collect(),
            default: choice.default.as_deref().map(|default| index[default]),
        },
        Step::Transform(_) => PlanStepKind::Transform { output: required("output") },
        Step::Succeed(_) => PlanStepKind::Succeed { output: take("output") },
        Step::Fail(fail) => PlanStepKind::Fail { error: fail.error.clone(), message: take("message") },
        Step::Signal(signal) => PlanStepKind::Signal {
            timeout_ms: signal.timeout_ms,
            catch: catch_rules(&signal.catch, index),
            keep_early: signal.keep_early,
        },
        Step::Subflow(subflow) => {
            let repeat = subflow.repeat.as_ref().map(|repeat| FlowLoop {
                until: required("repeat.until"),
                max_iterations: repeat.max_iterations.unwrap_or(REPEAT_ITERATIONS_DEFAULT),
            });
            PlanStepKind::Subflow(SubflowSpec {
                flow: subflow.flow.clone(),
                version: subflow.version,
                input: take("input"),
                items: take("items").map(|items| FlowItems {
                    items,
                    // Clamped for a version deployed before the bound (`check_new` refuses more).
                    max_concurrency: subflow.max_concurrency.unwrap_or(CHILDREN_GOING_MAX).min(CHILDREN_GOING_MAX),
                    tolerated_failures: subflow.tolerated_failures,
                }),
                repeat,
                timeout_ms: subflow.timeout_ms,
                catch: catch_rules(&subflow.catch, index),
            })
        }
        Step::Wait(wait) => PlanStepKind::Wait(match (wait.duration_ms, &wait.until) {
            (Some(duration_ms), _) => WaitFor::Fixed(duration_ms),
            (None, Some(_)) => WaitFor::Until(required("until")),
            (None, None) => WaitFor::Expr(required("duration")),
        }),
    }
}

/// The most items a map may have in flight: the item limit.
fn catch_rules(catch: &[Catch], index: &HashMap<&str, StepIndex>) -> Vec<CatchRule> {
    catch.iter().map(|rule| CatchRule { errors: rule.errors.clone(), next: index[rule.next.as_str()] }).collect()
}

/// The edges leaving step `position`, in the documented order: plain dependents, choice
/// rules, the choice default, catches.
fn outgoing_edges(position: usize, step: &Step, steps: &[Step], index: &HashMap<&str, StepIndex>) -> Vec<Edge> {
    let id = step.id();
    let mut edges: Vec<Edge> = steps
        .iter()
        .enumerate()
        .filter(|(_, dependent)| dependent.after().iter().any(|after| after == id))
        .map(|(dependent, _)| Edge { to: to_index(dependent), when: EdgeWhen::Succeeded })
        .collect();
    match step {
        Step::Choice(choice) => {
            for (rule, choice_rule) in choice.choices.iter().enumerate() {
                edges.push(Edge { to: index[choice_rule.next.as_str()], when: EdgeWhen::Branch(rule_number(rule)) });
            }
            if let Some(default) = &choice.default {
                edges.push(Edge { to: index[default.as_str()], when: EdgeWhen::Default });
            }
        }
        Step::Task(_) | Step::Map(_) | Step::Signal(_) | Step::Subflow(_) => {
            for (rule, catch) in catches(step).iter().enumerate() {
                edges.push(Edge { to: index[catch.next.as_str()], when: EdgeWhen::Caught(rule_number(rule)) });
            }
        }
        Step::Transform(_) | Step::Succeed(_) | Step::Fail(_) | Step::Wait(_) => {}
    }
    debug_assert!(edges.iter().all(|edge| usize::from(edge.to) != position), "validation refuses self edges");
    edges
}

fn rule_number(rule: usize) -> u16 {
    u16::try_from(rule).expect("validation refuses more than RULES_MAX rules")
}

/// The catch rules of a task, map, signal or subflow step (none for other kinds).
pub(crate) fn catches(step: &Step) -> &[Catch] {
    match step {
        Step::Task(task) => &task.catch,
        Step::Map(map) => &map.catch,
        Step::Signal(signal) => &signal.catch,
        Step::Subflow(subflow) => &subflow.catch,
        _ => &[],
    }
}

/// Why one step does not fit the model: the path of the field inside the step (empty for
/// the step itself) and the message. A step is read as the struct of its `kind`, so that
/// the path names the field (a step read as [`Step`] is buffered whole and loses it).
fn step_mistake(mut step: serde_json::Value) -> Option<(String, String)> {
    fn read<T: serde::de::DeserializeOwned>(step: serde_json::Value) -> Option<(String, String)> {
        let error = serde_path_to_error::deserialize::<_, T>(step).err()?;
        let path = error.path().to_string();
        Some((if path == "." { String::new() } else { path }, error.into_inner().to_string()))
    }
    let Some(kind) = step.get("kind").and_then(serde_json::Value::as_str).map(str::to_owned) else {
        // No kind, or not a string: reading it as a step says which.
        return read::<Step>(step);
    };
    if let Some(fields) = step.as_object_mut() {
        fields.remove("kind");
    }
    match kind.as_str() {
        "task" => read::<TaskStep>(step),
        "choice" => read::<ChoiceStep>(step),
        "map" => read::<MapStep>(step),
        "transform" => read::<TransformStep>(step),
        "succeed" => read::<SucceedStep>(step),
        "fail" => read::<FailStep>(step),
        "wait" => read::<WaitStep>(step),
        "signal" => read::<SignalStep>(step),
        "subflow" => read::<SubflowStep>(step),
        _ => read::<Step>(serde_json::json!({ "kind": kind })).map(|(_, message)| ("kind".to_owned(), message)),
    }
}

/// Refuses JSON whose arrays and objects nest deeper than `depth_max`, before parsing it.
fn check_json_depth(text: &str, depth_max: usize) -> Result<()> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for character in text.chars() {
        column += 1;
        if character == '\n' {
            (line, column) = (line + 1, 0);
        }
        if in_string {
            match (escaped, character) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match character {
            '"' => in_string = true,
            '{' | '[' => {
                depth += 1;
                if depth > depth_max {
                    return Err(DefinitionError::Parse(format!(
                        "JSON: nesting deeper than the limit of {depth_max} levels at line {line} column {column}: flatten the value"
                    )));
                }
            }
            '}' | ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Pushes an issue at `path`.
pub(crate) fn push_issue(issues: &mut Vec<Issue>, path: impl Into<String>, message: impl Into<String>) {
    issues.push(Issue { path: path.into(), message: message.into() });
}
