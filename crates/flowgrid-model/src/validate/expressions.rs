//! Expression fields: compiling each once, and checking which steps each one reads.
//!
//! Invariant: an expression may read `steps.<id>` only for a step that runs before it (a
//! transitive dependency through the full edge set); the flow-level `output` may read any
//! step. Task and map `output` expressions read the worker's result as `result`.

use std::collections::HashMap;

use crate::definition::{FlowDefinition, Step};
use crate::error::Issue;
use crate::expr::{Evaluator, Expr, ExprError};

use super::graph::Graph;
use super::{push_issue, step_path};

/// Path of the flow-level output expression.
pub(super) const FLOW_OUTPUT_PATH: &str = "output";
/// Path of the trigger's input expression, which reads its message and no step.
pub(super) const TRIGGER_INPUT_PATH: &str = "trigger.input";
/// Path of the concurrency key, which reads the run's input and no step.
pub(super) const CONCURRENCY_KEY_PATH: &str = "concurrency.key";
/// Path of the failure handler's input, which reads the failure as `result` and any step.
pub(super) const ON_FAILURE_INPUT_PATH: &str = "on_failure.input";

/// Field of a task or map step's cache key, which reads the task input and no step.
const CACHE_KEY_FIELD: &str = ".cache.key";

/// The variables an expression field has besides `input` and `steps` (a set of these).
type Locals = u8;
const NO_LOCALS: Locals = 0;
/// `item` and `index`: a map's `input`, and a subflow step's with `items`.
const ITEM: Locals = 1;
/// `result`: a task's or map's `output`, a loop's `until`, the failure handler's `input`.
const RESULT: Locals = 2;
/// `iteration`: a loop's `input` and `until`.
const ITERATION: Locals = 4;
/// `previous`: a loop's `input`.
const PREVIOUS: Locals = 8;

/// Each variable only some fields have, and where they have it.
const LOCAL_VARIABLES: [(&str, Locals, &str); 5] = [
    ("item", ITEM, "a map's `input` (and a subflow step's with `items`)"),
    ("index", ITEM, "a map's `input` (and a subflow step's with `items`)"),
    ("result", RESULT, "a task's or map's `output`, a loop's `until` and `on_failure.input`"),
    ("iteration", ITERATION, "a loop's `input` and `until` (a subflow step with `repeat`)"),
    ("previous", PREVIOUS, "a loop's `input` (a subflow step with `repeat`)"),
];

/// The variables every expression field has.
const COMMON_VARIABLES: [&str; 2] = ["input", "steps"];

/// One expression field of a definition.
struct Slot {
    path: String,
    /// The step the expression belongs to; `None` for the flow-level output.
    step: Option<usize>,
    /// The variables it has besides `input` and `steps`.
    locals: Locals,
}

/// Compiled expressions keyed by their path (`steps[2](route).choices[0].when`).
pub(super) struct ExpressionTable {
    compiled: HashMap<String, Expr>,
    slots: Vec<Slot>,
}

impl ExpressionTable {
    /// Compiles every expression field; each failure is an issue at the field's path.
    pub(super) fn compile(definition: &FlowDefinition, evaluator: &Evaluator, issues: &mut Vec<Issue>) -> Self {
        let mut table = ExpressionTable { compiled: HashMap::new(), slots: Vec::new() };
        for Field { path, step, locals, source } in fields(definition) {
            table.add(evaluator, path, step, locals, source, issues);
        }
        table
    }

    /// Compiles the field at `path`; a variable it reads that the field does not have
    /// (`item` outside a map's `input`) is an issue, as the expression would fail on every
    /// run.
    fn add(
        &mut self,
        evaluator: &Evaluator,
        path: String,
        step: Option<usize>,
        locals: Locals,
        source: &str,
        issues: &mut Vec<Issue>,
    ) {
        match evaluator.compile(source) {
            Ok(expr) => {
                for (variable, needs, fields) in LOCAL_VARIABLES {
                    if locals & needs == 0 && expr.reads(variable) {
                        push_issue(issues, &path, format!("reads `{variable}`, which only {fields} has"));
                    }
                }
                self.slots.push(Slot { path: path.clone(), step, locals });
                self.compiled.insert(path, expr);
            }
            Err(error) => push_issue(issues, path, compile_message(&error)),
        }
    }

    /// Takes the compiled expression at `path` out of the table.
    pub(super) fn take(&mut self, path: &str) -> Option<Expr> {
        self.compiled.remove(path)
    }

    /// Checks that every `steps.<id>` read names a step that runs before the reader.
    pub(super) fn check_references(&self, definition: &FlowDefinition, graph: &Graph, issues: &mut Vec<Issue>) {
        let position_of: HashMap<&str, usize> =
            definition.steps.iter().enumerate().map(|(position, step)| (step.id(), position)).collect();
        let mut upstream_cache: HashMap<usize, Vec<bool>> = HashMap::new();
        for slot in &self.slots {
            let expr = &self.compiled[&slot.path];
            let before_start = match slot.path.as_str() {
                TRIGGER_INPUT_PATH => {
                    Some("read the message as `input.message` (and `input.subject`, `input.sequence`)")
                }
                CONCURRENCY_KEY_PATH => Some("read the run's `input`"),
                path if path.ends_with(CACHE_KEY_FIELD) => Some(
                    "a cache key reads the task's input only, as `input`; compute what it needs in the step's `input`",
                ),
                _ => None,
            };
            if let (Some(advice), false) = (before_start, expr.step_refs.is_empty()) {
                let message = if slot.path.ends_with(CACHE_KEY_FIELD) {
                    format!("reads `steps`: {advice}")
                } else {
                    format!("reads `steps`, which a run has none of before it starts: {advice}")
                };
                push_issue(issues, &slot.path, message);
                continue;
            }
            for referenced in expr.step_refs.iter() {
                let Some(&target) = position_of.get(referenced.as_str()) else {
                    push_issue(issues, &slot.path, unknown_step_message(referenced, definition));
                    continue;
                };
                let Some(reader) = slot.step else { continue };
                let reader_id = definition.steps[reader].id();
                if target == reader {
                    let message = if slot.locals & RESULT != 0 {
                        format!("reads steps.{referenced}, its own step: read the worker's result as `result` instead")
                    } else {
                        format!("reads steps.{referenced}, its own step, which has no data yet: read another step or `input`")
                    };
                    push_issue(issues, &slot.path, message);
                    continue;
                }
                let upstream = upstream_cache.entry(reader).or_insert_with(|| graph.upstream(reader));
                if upstream[target] {
                    continue;
                }
                // Listing a step that runs after the reader in its `after` would make a cycle.
                let downstream = upstream_cache.entry(target).or_insert_with(|| graph.upstream(target))[reader];
                let message = if downstream {
                    format!(
                        "reads steps.{referenced}, which runs after {reader_id}: read it in a step that comes after \
                         {referenced}"
                    )
                } else {
                    format!("reads steps.{referenced}, which does not run before {reader_id}: add it to `after`")
                };
                push_issue(issues, &slot.path, message);
            }
        }
    }
}

/// The expression fields of a step that are set: (field path, source, the variables it
/// has besides `input` and `steps`).
fn expression_fields(step: &Step) -> Vec<(String, &str, Locals)> {
    let fields: Vec<(String, Option<&str>, Locals)> = match step {
        Step::Task(task) => {
            vec![
                ("input".to_owned(), task.input.as_deref(), NO_LOCALS),
                ("output".to_owned(), task.output.as_deref(), RESULT),
                ("cache.key".to_owned(), task.cache.as_ref().and_then(|cache| cache.key.as_deref()), NO_LOCALS),
            ]
        }
        Step::Map(map) => vec![
            ("items".to_owned(), Some(map.items.as_str()), NO_LOCALS),
            ("input".to_owned(), map.input.as_deref(), ITEM),
            ("output".to_owned(), map.output.as_deref(), RESULT),
            ("cache.key".to_owned(), map.cache.as_ref().and_then(|cache| cache.key.as_deref()), NO_LOCALS),
        ],
        Step::Choice(choice) => choice
            .choices
            .iter()
            .enumerate()
            .map(|(rule, choice_rule)| (format!("choices[{rule}].when"), Some(choice_rule.when.as_str()), NO_LOCALS))
            .collect(),
        Step::Transform(transform) => vec![("output".to_owned(), Some(transform.output.as_str()), NO_LOCALS)],
        Step::Succeed(succeed) => vec![("output".to_owned(), succeed.output.as_deref(), NO_LOCALS)],
        Step::Fail(fail) => vec![("message".to_owned(), fail.message.as_deref(), NO_LOCALS)],
        Step::Wait(wait) => vec![
            ("duration".to_owned(), wait.duration.as_deref(), NO_LOCALS),
            ("until".to_owned(), wait.until.as_deref(), NO_LOCALS),
        ],
        Step::Signal(_) => Vec::new(),
        Step::Subflow(subflow) => {
            let input_locals = match (&subflow.items, &subflow.repeat) {
                (Some(_), _) => ITEM,
                (None, Some(_)) => ITERATION | PREVIOUS,
                (None, None) => NO_LOCALS,
            };
            vec![
                ("items".to_owned(), subflow.items.as_deref(), NO_LOCALS),
                ("input".to_owned(), subflow.input.as_deref(), input_locals),
                (
                    "repeat.until".to_owned(),
                    subflow.repeat.as_ref().map(|repeat| repeat.until.as_str()),
                    RESULT | ITERATION,
                ),
            ]
        }
    };
    let when = ("when".to_owned(), step.when(), NO_LOCALS);
    fields.into_iter().chain([when]).filter_map(|(field, source, locals)| Some((field, source?, locals))).collect()
}

/// One expression field of a definition, as written.
struct Field<'a> {
    path: String,
    /// The step it belongs to; `None` for the flow's own fields.
    step: Option<usize>,
    locals: Locals,
    source: &'a str,
}

/// Every expression field of `definition`: the flow's own, then each step's.
fn fields(definition: &FlowDefinition) -> Vec<Field<'_>> {
    let flow_fields = [
        (FLOW_OUTPUT_PATH, NO_LOCALS, definition.output.as_deref()),
        (TRIGGER_INPUT_PATH, NO_LOCALS, definition.trigger.as_ref().and_then(|trigger| trigger.input.as_deref())),
        (
            CONCURRENCY_KEY_PATH,
            NO_LOCALS,
            definition.concurrency.as_ref().and_then(|concurrency| concurrency.key.as_deref()),
        ),
        (
            ON_FAILURE_INPUT_PATH,
            RESULT,
            definition.on_failure.as_ref().and_then(|on_failure| on_failure.input.as_deref()),
        ),
    ];
    let mut fields: Vec<Field<'_>> = flow_fields
        .into_iter()
        .filter_map(|(path, locals, source)| Some(Field { path: path.to_owned(), step: None, locals, source: source? }))
        .collect();
    for (position, step) in definition.steps.iter().enumerate() {
        let path = step_path(position, step.id());
        for (field, source, locals) in expression_fields(step) {
            fields.push(Field { path: format!("{path}.{field}"), step: Some(position), locals, source });
        }
    }
    fields
}

/// A rule for new deployments ([`super::deploy`]): a variable no expression has (a
/// misspelt `inptu`) is an issue, as the expression would fail on every run. Fields that
/// do not compile are left to [`ExpressionTable::compile`].
pub(super) fn check_variables(definition: &FlowDefinition, evaluator: &Evaluator, issues: &mut Vec<Issue>) {
    let known = |variable: &str| {
        COMMON_VARIABLES.contains(&variable) || LOCAL_VARIABLES.iter().any(|(name, ..)| *name == variable)
    };
    for Field { path, locals, source, .. } in fields(definition) {
        let Ok(expr) = evaluator.compile(source) else { continue };
        for variable in expr.variables().iter().filter(|variable| !known(variable)) {
            push_issue(
                issues,
                &path,
                format!(
                    "reads `{variable}`, which is no variable of expressions: this field reads {}",
                    readable_variables(locals)
                ),
            );
        }
    }
}

/// The variables a field with `locals` has, for messages: "`input`, `steps` and `result`".
fn readable_variables(locals: Locals) -> String {
    let locals = LOCAL_VARIABLES.iter().filter(|(_, needs, _)| locals & needs != 0).map(|(name, ..)| *name);
    let names: Vec<String> = COMMON_VARIABLES.into_iter().chain(locals).map(|name| format!("`{name}`")).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, others)) => format!("{} and {last}", others.join(", ")),
        None => String::new(),
    }
}

fn compile_message(error: &ExprError) -> String {
    match error {
        ExprError::Syntax { message, .. } => format!("the expression does not compile: {message}"),
        other => other.to_string(),
    }
}

fn unknown_step_message(referenced: &str, definition: &FlowDefinition) -> String {
    let dashed = definition.steps.iter().map(Step::id).find(|id| id.starts_with(&format!("{referenced}-")));
    match dashed {
        Some(id) => format!(
            "reads steps.{referenced}, which does not exist; step `{id}` cannot be read from expressions because `-` means \
             subtraction there: rename it with `_` (e.g. `{}`)",
            id.replace('-', "_")
        ),
        None => format!("reads steps.{referenced}, which does not exist: use the id of a step of this flow"),
    }
}
