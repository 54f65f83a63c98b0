//! Signal steps: a run waits for a signal from outside; the first one is the step's output.

use serde_json::json;

use super::replay::replay;
use super::support::Harness;
use crate::{Applied, Event, RunStatus, SignalRefused, StepStatus, TimerKey};

const APPROVAL: &str = r##"
name: approval
steps:
  - { kind: task, id: draft, pool: cpu, task: draft }
  - kind: signal
    id: approve
    after: [draft]
    timeout_ms: 60000
    catch: [{ errors: [timeout], next: escalate }]
  - { kind: task, id: publish, after: [approve], pool: cpu, task: publish, input: "steps.approve.output" }
  - { kind: transform, id: escalate, output: '"nobody approved"' }
"##;

fn signal(step: &str, data: serde_json::Value) -> Event {
    Event::SignalReceived { step: step.to_owned(), data, id: None }
}

fn timeout(step: &str) -> TimerKey {
    TimerKey::SignalTimeout { step: step.to_owned() }
}

#[test]
fn the_first_signal_is_the_output_and_later_ones_change_nothing() {
    let mut harness = Harness::start(APPROVAL, json!({}), 1_000);
    assert_eq!(harness.run.signal_refused("approve"), Some(SignalRefused::NotStarted));
    assert_eq!(
        harness.apply(1_010, signal("approve", json!("early"))),
        Applied::Ignored("the signal step has not started")
    );
    assert_eq!(harness.run.signal_refused("draft"), Some(SignalRefused::NotASignalStep { kind: "task" }));
    assert_eq!(harness.run.signal_refused("nope"), Some(SignalRefused::NoSuchStep));

    harness.succeed(1_100, "draft", None, 1, json!("text"));
    assert_eq!(harness.armed(&timeout("approve")), Some(61_100));
    assert_eq!(harness.step_status("approve"), StepStatus::Running);
    assert_eq!(harness.run.signal_refused("approve"), None);

    assert_eq!(harness.apply(2_000, signal("approve", json!({"by": "ana"}))), Applied::Accepted);
    assert!(harness.cancelled(&timeout("approve")), "the timeout is dropped");
    let approve = harness.step("approve");
    assert_eq!((approve.status, approve.output.clone()), (StepStatus::Succeeded, Some(json!({"by": "ana"}))));
    assert_eq!(harness.dispatched_names(), ["publish"]);
    assert_eq!(*harness.dispatched()[0].input, json!({"by": "ana"}));

    assert_eq!(harness.run.signal_refused("approve"), Some(SignalRefused::Over { status: StepStatus::Succeeded }));
    assert_eq!(
        harness.apply(2_001, signal("approve", json!({"by": "bob"}))),
        Applied::Ignored("the signal step is over")
    );
    assert_eq!(harness.fire(61_100, timeout("approve")), Applied::Ignored("timer not armed"));
    assert_eq!(harness.step("approve").output, Some(json!({"by": "ana"})), "exactly one signal counts");

    harness.succeed(2_100, "publish", None, 1, json!("published"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds the signal");
}

#[test]
fn no_signal_in_time_fails_the_step_with_timeout_and_its_catch_takes_over() {
    let mut harness = Harness::start(APPROVAL, json!({}), 0);
    harness.succeed(100, "draft", None, 1, json!("text"));
    assert!(harness.run.armed_timers().contains(&(timeout("approve"), 60_100)));
    assert_eq!(harness.fire(60_100, timeout("approve")), Applied::Accepted);
    let approve = harness.step("approve");
    assert_eq!((approve.status, approve.caught), (StepStatus::Failed, true));
    assert_eq!(approve.error.expect("an error").code, "timeout");
    assert_eq!(harness.step_status("publish"), StepStatus::Skipped);
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.view().output, Some(json!({"escalate": "nobody approved"})));
    assert_eq!(harness.apply(60_200, signal("approve", json!(1))), Applied::Ignored("run already ended"));
}

#[test]
fn a_signal_step_without_timeout_waits_until_the_run_ends() {
    let yaml = r##"
name: forever
steps:
  - { kind: signal, id: go }
"##;
    let mut harness = Harness::start(yaml, json!({}), 0);
    assert!(harness.run.armed_timers().is_empty(), "no timeout, no timer");
    assert_eq!(harness.apply(5, Event::CancelRequested { reason: "stop".into() }), Applied::Accepted);
    assert_eq!(harness.step_status("go"), StepStatus::Cancelled);
    assert_eq!(harness.run.signal_refused("go"), Some(SignalRefused::Over { status: StepStatus::Cancelled }));
}

const EARLY: &str = r##"
name: early
steps:
  - { kind: task, id: draft, pool: cpu, task: draft }
  - { kind: signal, id: approve, after: [draft], keep_early: true, timeout_ms: 60000 }
  - { kind: task, id: publish, after: [approve], pool: cpu, task: publish, input: "steps.approve.output" }
"##;

#[test]
fn a_step_that_keeps_early_signals_takes_the_first_one_sent_before_it_started() {
    let mut harness = Harness::start(EARLY, json!({}), 0);
    assert_eq!(harness.run.signal_refused("approve"), None);
    assert_eq!(harness.apply(10, signal("approve", json!({"by": "ana"}))), Applied::Accepted);
    let approve = harness.step("approve");
    assert_eq!((approve.status, approve.output), (StepStatus::Pending, Some(json!({"by": "ana"}))), "kept");
    assert_eq!(harness.run.signal_refused("approve"), Some(SignalRefused::Over { status: StepStatus::Pending }));
    assert_eq!(harness.apply(20, signal("approve", json!({"by": "bob"}))), Applied::Ignored("the signal step is over"));

    harness.succeed(100, "draft", None, 1, json!("text"));
    let approve = harness.step("approve");
    assert_eq!((approve.status, approve.output), (StepStatus::Succeeded, Some(json!({"by": "ana"}))));
    assert!(harness.armed(&timeout("approve")).is_none(), "no wait, so no timeout");
    assert_eq!(*harness.dispatched()[0].input, json!({"by": "ana"}), "the steps after it go on at once");
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());

    // A kept signal of a run that ends before the step starts is dropped with it.
    let mut harness = Harness::start(EARLY, json!({}), 0);
    harness.apply(10, signal("approve", json!("kept")));
    harness.apply(20, Event::CancelRequested { reason: "no".to_owned() });
    let approve = harness.step("approve");
    assert_eq!((approve.status, approve.output), (StepStatus::Cancelled, None));

    // So is one kept for a step whose condition fails when it is due: the step failed.
    let failing = EARLY.replace("keep_early: true,", "keep_early: true, when: 'input.n.len() > 1',");
    let mut harness = Harness::start(&failing, json!({"n": 1}), 0);
    harness.apply(10, signal("approve", json!("kept")));
    harness.succeed(100, "draft", None, 1, json!("text"));
    let approve = harness.step("approve");
    assert_eq!((approve.status, approve.output.clone()), (StepStatus::Failed, None), "{approve:?}");
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

/// A signal kept for a step that never started is not that step's output: a run that a
/// `succeed` step ends first reads `()` for it in its `output`, as for any step that did not
/// succeed.
#[test]
fn a_kept_signal_of_a_run_that_ends_first_is_not_in_its_output() {
    let yaml = r##"
name: pay
steps:
  - { kind: task, id: check, pool: cpu, task: check }
  - { kind: signal, id: payment, after: [check], keep_early: true }
  - { kind: task, id: gate, pool: cpu, task: gate }
  - { kind: succeed, id: done, after: [gate], when: 'input.free' }
output: '#{ paid: steps.payment.output }'
"##;
    let mut harness = Harness::start(yaml, json!({"free": true}), 0);
    assert_eq!(harness.apply(10, signal("payment", json!({"amount": 5}))), Applied::Accepted);
    assert_eq!(harness.step("payment").output, Some(json!({"amount": 5})), "kept while the step is pending");
    harness.succeed(20, "gate", None, 1, json!("open"));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert_eq!(view.output, Some(json!({"paid": null})));
}
