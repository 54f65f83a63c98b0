//! Loops: a subflow step with `repeat` runs its child again until `until` holds.

use serde_json::{json, Value};

use super::replay::replay;
use super::support::{Harness, RUN};
use crate::{Applied, Effect, Event, RunStatus, StepStatus, TaskError, TimerKey};
use flowgrid_model::{ParentRef, RunId};

/// A counter: each iteration's child gets the output of the one before (no `input`).
const COUNT: &str = r##"
name: count
steps:
  - kind: subflow
    id: step
    flow: increment
    repeat: { until: 'result.n >= 3', max_iterations: 5 }
    timeout_ms: 60000
  - { kind: transform, id: done, after: [step], output: "steps.step.output.n" }
"##;

fn child(round: u32) -> RunId {
    ParentRef::child_run_id("increment", &RunId(RUN.into()), "step", None, round)
}

/// The input of every child the last transition asked for.
fn started_inputs(effects: &[Effect]) -> Vec<Value> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::StartChild(start) => Some((*start.input).clone()),
            _ => None,
        })
        .collect()
}

fn succeeded(round: u32, output: Value) -> Event {
    Event::ChildEnded {
        step: "step".to_owned(),
        item: None,
        child: child(round),
        status: RunStatus::Succeeded,
        output: Some(output),
        error: None,
        refused: false,
        keeps_round: false,
    }
}

#[test]
fn a_loop_runs_its_child_again_with_the_last_output_until_its_condition_holds() {
    let mut harness = Harness::start(COUNT, json!({"n": 0}), 1_000);
    assert_eq!(started_inputs(&harness.effects), [json!({"n": 0})], "the first child gets the run's input");
    assert_eq!((harness.step("step").iteration, harness.step("step").child_run), (Some(0), Some(child(0))));

    for round in 0..2 {
        let output = json!({"n": round + 1});
        assert_eq!(harness.apply(2_000 + u64::from(round), succeeded(round, output.clone())), Applied::Accepted);
        assert_eq!(started_inputs(&harness.effects), [output], "iteration {} gets the output before it", round + 1);
        let step = harness.step("step");
        assert_eq!((step.status, step.iteration, step.attempts), (StepStatus::Running, Some(round + 1), round + 2));
        assert_eq!(step.child_run, Some(child(round + 1)), "each iteration's child is a new run");
        assert!(
            !harness.effects.iter().any(|effect| matches!(effect, Effect::CancelTimer { .. })),
            "the step's timeout stays armed between iterations"
        );
    }
    let stale = harness.apply(2_500, succeeded(0, json!({"n": 9})));
    assert_eq!(stale, Applied::Ignored("not the child of this step"), "an earlier iteration's end is not taken twice");

    assert_eq!(harness.apply(3_000, succeeded(2, json!({"n": 3}))), Applied::Accepted);
    assert!(started_inputs(&harness.effects).is_empty());
    let step = harness.step("step");
    assert_eq!((step.status, step.output, step.iteration), (StepStatus::Succeeded, Some(json!({"n": 3})), None));
    assert_eq!(harness.run.view().output, Some(json!({"done": 3})));
    assert!(harness.run.open_child_starts().is_empty());

    let (replayed, effects) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds every iteration");
    assert_eq!(started_inputs(&effects).len(), 3, "replaying asks for the same three children");
}

#[test]
fn a_loop_whose_condition_never_holds_fails_after_its_last_iteration_and_a_catch_takes_it() {
    let yaml = r##"
name: poll
steps:
  - kind: subflow
    id: step
    flow: increment
    input: '#{ attempt: iteration, last: previous }'
    repeat: { until: 'result.ready', max_iterations: 2 }
    catch: [{ errors: [iterations_exhausted], next: gave_up }]
  - { kind: transform, id: gave_up, output: '"gave up"' }
"##;
    let mut harness = Harness::start(yaml, json!({}), 0);
    assert_eq!(started_inputs(&harness.effects), [json!({"attempt": 0, "last": null})]);
    assert_eq!(harness.apply(10, succeeded(0, json!({"ready": false, "seen": 1}))), Applied::Accepted);
    assert_eq!(started_inputs(&harness.effects), [json!({"attempt": 1, "last": {"ready": false, "seen": 1}})]);
    assert_eq!(harness.apply(20, succeeded(1, json!({"ready": false}))), Applied::Accepted);
    assert!(started_inputs(&harness.effects).is_empty(), "no third iteration");
    let step = harness.step("step");
    assert_eq!((step.status, step.caught, step.attempts), (StepStatus::Failed, true, 2));
    let error = step.error.expect("the loop's error");
    assert_eq!(error.code, "iterations_exhausted");
    assert!(error.message.contains("ran 2 iterations of flow `increment`"), "{error:?}");
    assert_eq!(harness.run.view().output, Some(json!({"gave_up": "gave up"})));
}

#[test]
fn a_failed_iteration_fails_the_loop_and_a_broken_condition_fails_the_run() {
    let mut harness = Harness::start(COUNT, json!({"n": 0}), 0);
    let error = TaskError { code: "boom".into(), message: "no".into(), retryable: false };
    let failed = Event::ChildEnded {
        step: "step".to_owned(),
        item: None,
        child: child(0),
        status: RunStatus::Failed,
        output: None,
        error: Some(error),
        refused: false,
        keeps_round: false,
    };
    assert_eq!(harness.apply(10, failed), Applied::Accepted);
    assert!(started_inputs(&harness.effects).is_empty(), "no next iteration after a failure");
    assert_eq!((harness.step_status("step"), harness.run.status()), (StepStatus::Failed, RunStatus::Failed));

    let mut harness = Harness::start(COUNT, json!({"n": 0}), 0);
    assert_eq!(harness.apply(10, succeeded(0, json!("not an object"))), Applied::Accepted);
    assert!(started_inputs(&harness.effects).is_empty());
    let error = harness.run.error().expect("the run's error").clone();
    assert_eq!(error.code, "expression_error", "{error:?}");
    assert!(error.message.contains("repeat.until"), "{error:?}");
    assert!(
        !harness.effects.iter().any(|effect| matches!(effect, Effect::CancelChild { .. })),
        "the child that ended is not cancelled"
    );
}

#[test]
fn a_loop_times_out_over_all_its_iterations_and_cancelling_the_run_cancels_the_current_child() {
    let mut harness = Harness::start(COUNT, json!({"n": 0}), 1_000);
    assert_eq!(harness.apply(2_000, succeeded(0, json!({"n": 1}))), Applied::Accepted);
    let timer = TimerKey::SubflowTimeout { step: "step".into() };
    assert_eq!(harness.fire(61_000, timer), Applied::Accepted, "counted from the step's start, not the iteration's");
    let cancelled: Vec<&RunId> = harness
        .effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::CancelChild { child, .. } => Some(child),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, [&child(1)], "only the child of the current iteration");
    assert_eq!(harness.step("step").error.map(|error| error.code), Some("timeout".to_owned()));

    let mut harness = Harness::start(COUNT, json!({"n": 0}), 0);
    assert_eq!(harness.apply(10, succeeded(0, json!({"n": 1}))), Applied::Accepted);
    assert_eq!(harness.apply(20, Event::CancelRequested { reason: "stop".into() }), Applied::Accepted);
    let cancels = harness
        .effects
        .iter()
        .filter(|effect| matches!(effect, Effect::CancelChild { child: cancelled, .. } if *cancelled == child(1)));
    assert_eq!(cancels.count(), 1, "{:?}", harness.effects);
}
