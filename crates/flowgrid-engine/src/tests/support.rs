//! Helpers: build plans from YAML, drive a run, pick effects apart.

use std::sync::{Arc, OnceLock};

use flowgrid_model::{parse_definition, AttemptId, Evaluator, FlowPlan, Labels, Limits, Millis, RunId};
use serde_json::Value;

use crate::{
    Applied, Effect, Event, Run, RunStart, RunStatus, StepStatus, StepView, TaskDispatch, TaskError, TimerKey,
};

pub const RUN: &str = "run-1";

pub fn evaluator() -> &'static Evaluator {
    static EVALUATOR: OnceLock<Evaluator> = OnceLock::new();
    EVALUATOR.get_or_init(|| Evaluator::new(&Limits::default()))
}

pub fn plan(yaml: &str) -> Arc<FlowPlan> {
    let limits = Limits::default();
    let definition = parse_definition(yaml, &limits).expect("the test definition parses");
    Arc::new(FlowPlan::compile(definition, 1, evaluator(), &limits).expect("the test definition compiles"))
}

pub fn attempt(step: &str, item: Option<u32>, number: u32) -> AttemptId {
    AttemptId { run_id: RunId(RUN.into()), step: step.to_owned(), item, attempt: number }
}

pub fn error(code: &str, retryable: bool) -> TaskError {
    TaskError { code: code.to_owned(), message: format!("{code} happened"), retryable }
}

/// A run with the effects of its last transition and the accepted history.
pub struct Harness {
    pub plan: Arc<FlowPlan>,
    pub run: Run,
    pub input: Value,
    pub started_ms: Millis,
    /// Effects of the last `start` or `apply`.
    pub effects: Vec<Effect>,
    /// Every effect so far.
    pub all_effects: Vec<Effect>,
    /// Accepted events with their times.
    pub history: Vec<(Millis, Event)>,
    /// Whether the run started queued.
    pub queued: bool,
    /// The start time it was started with, if any.
    pub start_at: Option<Millis>,
}

impl Harness {
    pub fn start(yaml: &str, input: Value, now: Millis) -> Harness {
        Harness::begin(yaml, input, now, false)
    }

    /// Starts the run queued, as a run of a flow whose concurrency limit has no room.
    pub fn start_queued(yaml: &str, input: Value, now: Millis) -> Harness {
        Harness::begin(yaml, input, now, true)
    }

    /// Starts the run at `now` with the later start time `start_at`.
    pub fn start_delayed(yaml: &str, input: Value, now: Millis, start_at: Millis) -> Harness {
        Harness::begin_at(yaml, input, now, false, Some(start_at))
    }

    fn begin(yaml: &str, input: Value, now: Millis, queued: bool) -> Harness {
        Harness::begin_at(yaml, input, now, queued, None)
    }

    fn begin_at(yaml: &str, input: Value, now: Millis, queued: bool, start_at: Option<Millis>) -> Harness {
        let plan = plan(yaml);
        let mut effects = Vec::new();
        let run = start_run(&plan, &input, now, queued, start_at, &mut effects);
        let all_effects = effects.clone();
        Harness { plan, run, input, started_ms: now, all_effects, effects, history: Vec::new(), queued, start_at }
    }

    pub fn apply(&mut self, now: Millis, event: Event) -> Applied {
        let mut effects = Vec::new();
        let applied = self.run.apply(evaluator(), now, &event, &mut effects);
        if applied == Applied::Accepted {
            self.history.push((now, event));
        } else {
            assert!(effects.is_empty(), "an ignored event has no effect");
        }
        self.all_effects.extend(effects.iter().cloned());
        self.effects = effects;
        applied
    }

    pub fn succeed(&mut self, now: Millis, step: &str, item: Option<u32>, number: u32, output: Value) -> Applied {
        self.apply(now, Event::TaskSucceeded { attempt: attempt(step, item, number), output })
    }

    pub fn fail(&mut self, now: Millis, step: &str, item: Option<u32>, number: u32, error: TaskError) -> Applied {
        self.apply(now, Event::TaskFailed { attempt: attempt(step, item, number), error })
    }

    pub fn fire(&mut self, now: Millis, timer: TimerKey) -> Applied {
        self.apply(now, Event::TimerFired { timer })
    }

    /// Attempts dispatched by the last transition.
    pub fn dispatched(&self) -> Vec<TaskDispatch> {
        dispatches(&self.effects)
    }

    /// `step` or `step[item]` of each attempt dispatched by the last transition.
    pub fn dispatched_names(&self) -> Vec<String> {
        self.dispatched().iter().map(|dispatch| name(&dispatch.attempt)).collect()
    }

    pub fn step(&self, id: &str) -> StepView {
        self.run.view().steps.into_iter().find(|step| step.id == id).expect("the step exists")
    }

    pub fn step_status(&self, id: &str) -> StepStatus {
        self.step(id).status
    }

    /// The statuses the run finished with, over every effect so far.
    pub fn finished(&self) -> Vec<RunStatus> {
        self.all_effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::RunFinished { status, .. } => Some(*status),
                _ => None,
            })
            .collect()
    }

    /// True when the last transition cancelled `timer`.
    pub fn cancelled(&self, timer: &TimerKey) -> bool {
        self.effects.iter().any(|effect| {
            matches!(effect, Effect::CancelTimer { run_id, timer: cancelled, .. } if cancelled == timer && run_id == self.run.id())
        })
    }

    /// Due time of `timer` armed by the last transition.
    pub fn armed(&self, timer: &TimerKey) -> Option<Millis> {
        self.effects.iter().find_map(|effect| match effect {
            Effect::ArmTimer { timer: armed, due_ms, .. } if armed == timer => Some(*due_ms),
            _ => None,
        })
    }
}

/// Starts the test run of `plan` (queued or not, with a start time or not).
pub fn start_run(
    plan: &Arc<FlowPlan>,
    input: &Value,
    now: Millis,
    queued: bool,
    start_at: Option<Millis>,
    effects: &mut Vec<Effect>,
) -> Run {
    let start =
        RunStart { run_id: RunId(RUN.into()), input: input.clone(), labels: Labels::new(), now, queued, start_at };
    Run::start(Arc::clone(plan), evaluator(), start, effects)
}

pub fn dispatches(effects: &[Effect]) -> Vec<TaskDispatch> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Dispatch(dispatch) => Some(dispatch.clone()),
            _ => None,
        })
        .collect()
}

pub fn name(attempt: &AttemptId) -> String {
    match attempt.item {
        Some(item) => format!("{}[{item}]", attempt.step),
        None => attempt.step.clone(),
    }
}
