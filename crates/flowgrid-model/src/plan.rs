//! The compiled form of a validated definition: steps by index, expressions compiled,
//! edges resolved. The engine runs plans, never raw definitions.
//!
//! Edge semantics (the engine relies on them):
//! - `PlanStep::deps` lists each step this one waits for, once: its `after` entries plus
//!   every choice and catch that names it as `next`.
//! - `PlanStep::outgoing` lists the edges leaving a step. When a step resolves, an edge is
//!   *activated* if its [`EdgeWhen`] matches how the step resolved.
//! - A step becomes ready once all its deps have resolved and at least one incoming edge
//!   was activated; if all have resolved and none was activated, it is skipped (and a
//!   skipped step activates no edge). Steps without deps are ready when the run starts.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::definition::{FlowDefinition, RetryPolicy, StartRate, WhenFull};
use crate::expr::{Evaluator, Expr, Scope};
use crate::input_schema::InputSchema;
use crate::limits::{Limits, CONCURRENCY_KEY_BYTES_MAX};
use crate::schedule::Timetable;

/// Position of a step in [`FlowPlan::steps`] (the order of the definition).
pub type StepIndex = u16;

/// A validated, compiled flow version: what the engine runs.
#[derive(Debug)]
pub struct FlowPlan {
    pub name: String,
    pub version: u32,
    pub definition: FlowDefinition,
    pub steps: Vec<PlanStep>,
    /// Flow-level output expression.
    pub output: Option<Expr>,
    pub timeout_ms: Option<u64>,
    /// Steps no other step follows when they succeed (a catch's edge leads on only from a
    /// failure): their outputs form the default run output.
    pub sinks: Vec<StepIndex>,
    /// When the grid starts runs of this version by itself.
    pub schedule: Option<Timetable>,
    /// The trigger's input expression, over its message.
    pub trigger_input: Option<Expr>,
    /// What every run's input must match.
    pub input_schema: Option<InputSchema>,
    /// How many runs may go at once.
    pub concurrency: Option<PlanConcurrency>,
    /// The flow started when a run fails.
    pub on_failure: Option<PlanOnFailure>,
    index: HashMap<String, StepIndex>,
}

/// A compiled `on_failure`.
#[derive(Debug)]
pub struct PlanOnFailure {
    pub flow: String,
    /// The handler's input, over the failure as `result`; `None`: the failure itself.
    pub input: Option<Expr>,
    pub statuses: Vec<crate::FailureEnd>,
}

/// A flow's concurrency limit: at most `max` runs at once of each key, and runs of each
/// key starting at most at `rate`.
#[derive(Debug)]
pub struct PlanConcurrency {
    /// Runs at once; `None`: no bound.
    pub max: Option<u32>,
    pub rate: Option<StartRate>,
    /// Gives a run's key from its input; one key for every run when absent.
    pub key: Option<Expr>,
    pub when_full: WhenFull,
}

impl PlanConcurrency {
    /// The key a run with `input` counts under: what the key expression gives (a string as
    /// it is, any other value as JSON), or `""` without one. Fails when the expression
    /// does, or gives more than [`CONCURRENCY_KEY_BYTES_MAX`] bytes.
    pub fn key_of(&self, evaluator: &Evaluator, input: &Value) -> Result<String, String> {
        let Some(expr) = &self.key else { return Ok(String::new()) };
        let value = evaluator
            .eval(expr, &Scope { input: Some(input), ..Scope::default() })
            .map_err(|error| format!("concurrency.key: {error}"))?;
        let key = match value {
            Value::String(key) => key,
            other => other.to_string(),
        };
        if key.len() > CONCURRENCY_KEY_BYTES_MAX {
            return Err(format!(
                "concurrency.key gives {} bytes for this input, over the limit of {CONCURRENCY_KEY_BYTES_MAX}",
                key.len()
            ));
        }
        Ok(key)
    }
}

/// One step of a plan with its resolved edges.
#[derive(Debug)]
pub struct PlanStep {
    pub id: String,
    pub kind: PlanStepKind,
    /// Read when the step would start: `false` skips it.
    pub when: Option<Expr>,
    pub deps: Vec<StepIndex>,
    pub outgoing: Vec<Edge>,
}

/// An edge to `to`, activated when its source resolved as `when` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub to: StepIndex,
    pub when: EdgeWhen,
}

/// How the source of an edge must resolve for the edge to be activated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EdgeWhen {
    /// A plain `after` edge: the source succeeded (for a choice: whichever branch it took).
    Succeeded,
    /// The choice took rule `n` (0-based).
    Branch(u16),
    /// The choice took its `default`.
    Default,
    /// The source failed and its catch `n` (0-based) handled the error.
    Caught(u16),
}

/// Worker-side settings shared by `task` and `map` steps.
#[derive(Debug)]
pub struct TaskSpec {
    /// Shared with every dispatch of the step (and the metrics labels of its pool).
    pub pool: Arc<str>,
    pub task: Arc<str>,
    /// Input expression; `None` means the run input (task) or the item (map).
    pub input: Option<Expr>,
    /// Output expression over `result`; `None` means the result as is.
    pub output: Option<Expr>,
    pub retry: RetryPolicy,
    /// Start-to-close timeout of one attempt (the default applied when the definition has none).
    pub timeout_ms: u64,
    /// How long the step may take over all its attempts (and items); `None`: no limit.
    pub total_timeout_ms: Option<u64>,
    pub priority: u8,
    /// Worker results reused across runs; `None`: every attempt goes to a worker.
    pub cache: Option<PlanCache>,
    pub catch: Vec<CatchRule>,
}

/// A compiled `cache`: what identifies a task's result, and for how long it is reused.
#[derive(Debug)]
pub struct PlanCache {
    /// Expression over the task input (as `input`); `None`: the task input itself.
    pub key: Option<Expr>,
    pub ttl_ms: u64,
}

impl PlanCache {
    /// The value that identifies the result of a task with `task_input`: what the key
    /// expression gives, or the task input. Fails when the expression does.
    pub fn key_of(&self, evaluator: &Evaluator, task_input: &Value) -> Result<Value, crate::ExprError> {
        match &self.key {
            Some(expr) => evaluator.eval(expr, &Scope { input: Some(task_input), ..Scope::default() }),
            None => Ok(task_input.clone()),
        }
    }
}

/// A compiled catch: where a failure with a handled code goes.
#[derive(Debug)]
pub struct CatchRule {
    /// Error codes handled; `*` handles all.
    pub errors: Vec<String>,
    pub next: StepIndex,
}

/// What a step does, with its expressions compiled and step names resolved to indexes.
#[derive(Debug)]
pub enum PlanStepKind {
    Task(TaskSpec),
    Map {
        items: Expr,
        spec: TaskSpec,
        /// Items in flight at once (the default: the item limit).
        max_concurrency: u32,
        tolerated_failures: u32,
    },
    Choice {
        rules: Vec<(Expr, StepIndex)>,
        default: Option<StepIndex>,
    },
    Transform {
        output: Expr,
    },
    Succeed {
        output: Option<Expr>,
    },
    Fail {
        error: String,
        message: Option<Expr>,
    },
    Wait(WaitFor),
    Signal {
        /// No signal by then fails the step with code `timeout`.
        timeout_ms: Option<u64>,
        catch: Vec<CatchRule>,
        /// A signal sent before the step starts is kept for it.
        keep_early: bool,
    },
    Subflow(SubflowSpec),
}

/// A step that runs another flow as a child run, or one per item.
#[derive(Debug)]
pub struct SubflowSpec {
    pub flow: String,
    /// `None`: the latest version when the step starts.
    pub version: Option<u32>,
    /// Input expression; `None` means the run input (the item, with `items`).
    pub input: Option<Expr>,
    /// Set when the step runs one child per item.
    pub items: Option<FlowItems>,
    /// Set when the step runs its child again until a condition holds.
    pub repeat: Option<FlowLoop>,
    /// Past it the children are cancelled and the step fails with code `timeout`.
    pub timeout_ms: Option<u64>,
    pub catch: Vec<CatchRule>,
}

/// The fan-out of a subflow step over a list.
#[derive(Debug)]
pub struct FlowItems {
    pub items: Expr,
    /// Children going at once (the default: the item limit).
    pub max_concurrency: u32,
    pub tolerated_failures: u32,
}

/// The loop of a subflow step: children one after the other until `until` holds.
#[derive(Debug)]
pub struct FlowLoop {
    /// Read after each child succeeds (`result`, `iteration`): true ends the loop.
    pub until: Expr,
    pub max_iterations: u32,
}

/// How long a `wait` step waits.
#[derive(Debug)]
pub enum WaitFor {
    /// A fixed number of milliseconds.
    Fixed(u64),
    /// An expression giving the milliseconds when the step starts.
    Expr(Expr),
    /// An expression giving the time it ends (Unix ms or RFC 3339) when the step starts.
    Until(Expr),
}

/// The longest wait a `wait` step may ask for.
pub const WAIT_MS_MAX: u64 = crate::limits::DURATION_MS_MAX;
/// What a `wait` step's `duration` expression must give, for its error message (a test
/// keeps it in step with [`WAIT_MS_MAX`]).
pub(crate) const WAIT_MS_EXPECTED: &str = "a number of milliseconds from 0 to 31622400000 (366 days)";

/// Start-to-close timeout of a task attempt when the definition sets none.
pub const TASK_TIMEOUT_MS_DEFAULT: u64 = 5 * 60 * 1000;
/// Priority of a task when the definition sets none (0-9).
pub const PRIORITY_DEFAULT: u8 = 5;
/// Highest task priority (the lowest is 0).
pub const PRIORITY_MAX: u8 = 9;

impl FlowPlan {
    /// Validates `definition` and compiles it. Errors list every located issue.
    pub fn compile(
        definition: FlowDefinition,
        version: u32,
        evaluator: &Evaluator,
        limits: &Limits,
    ) -> crate::Result<FlowPlan> {
        crate::validate::compile(definition, version, evaluator, limits)
    }

    pub(crate) fn assemble(
        definition: FlowDefinition,
        version: u32,
        steps: Vec<PlanStep>,
        output: Option<Expr>,
        trigger_input: Option<Expr>,
        concurrency_key: Option<Expr>,
        on_failure_input: Option<Expr>,
    ) -> FlowPlan {
        let index = steps.iter().enumerate().map(|(position, step)| (step.id.clone(), position as StepIndex)).collect();
        let sinks = steps
            .iter()
            .enumerate()
            // A catch's edge leads on only when the step failed, when it has no output.
            .filter(|(_, step)| step.outgoing.iter().all(|edge| matches!(edge.when, EdgeWhen::Caught(_))))
            .map(|(position, _)| position as StepIndex)
            .collect();
        let schedule = definition
            .schedule
            .as_ref()
            .map(|schedule| Timetable::of(schedule).expect("validation parsed the schedule"));
        let concurrency = definition.concurrency.as_ref().map(|concurrency| PlanConcurrency {
            max: concurrency.max,
            rate: concurrency.rate,
            key: concurrency_key,
            when_full: concurrency.when_full,
        });
        let on_failure = definition.on_failure.as_ref().map(|on_failure| PlanOnFailure {
            flow: on_failure.flow.clone(),
            input: on_failure_input,
            statuses: on_failure.statuses.clone(),
        });
        let input_schema = definition
            .input_schema
            .as_ref()
            .map(|schema| InputSchema::compile(schema).expect("validation compiled the input schema"));
        FlowPlan {
            name: definition.name.clone(),
            version,
            timeout_ms: definition.timeout_ms,
            schedule,
            definition,
            steps,
            output,
            trigger_input,
            input_schema,
            concurrency,
            on_failure,
            sinks,
            index,
        }
    }

    /// The index of step `id`.
    pub fn step_index(&self, id: &str) -> Option<StepIndex> {
        self.index.get(id).copied()
    }

    /// The step at `index`; panics on an index that is not from this plan.
    pub fn step(&self, index: StepIndex) -> &PlanStep {
        &self.steps[usize::from(index)]
    }
}

impl PlanStepKind {
    /// The catch that handles `code` for a step that can fail on its own (task, map,
    /// signal, subflow), with its position.
    pub fn catch_for(&self, code: &str) -> Option<(u16, &CatchRule)> {
        let catch = match self {
            PlanStepKind::Task(spec) | PlanStepKind::Map { spec, .. } => &spec.catch,
            PlanStepKind::Signal { catch, .. } => catch,
            PlanStepKind::Subflow(spec) => &spec.catch,
            _ => return None,
        };
        catch.iter().enumerate().find(|(_, rule)| rule.handles(code)).map(|(position, rule)| (position as u16, rule))
    }
}

impl CatchRule {
    /// Whether this catch handles error `code`.
    pub fn handles(&self, code: &str) -> bool {
        self.errors.iter().any(|handled| handled == "*" || handled == code)
    }
}
