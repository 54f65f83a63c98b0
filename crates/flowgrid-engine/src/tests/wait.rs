//! Wait steps: a durable timer inside the engine, fixed or from an expression.

use serde_json::json;

use super::replay::replay;
use super::support::{attempt, Harness};
use crate::{Applied, Event, RunStatus, StepStatus, TimerKey};

const COOL_DOWN: &str = r##"
name: cool-down
steps:
  - { kind: task, id: fetch, pool: cpu, task: fetch }
  - kind: wait
    id: pause
    after: [fetch]
    duration: "steps.fetch.output.retry_after_ms"
  - { kind: task, id: again, after: [pause], pool: cpu, task: fetch, input: "steps.pause.output" }
"##;

fn wait_over(step: &str) -> TimerKey {
    TimerKey::WaitOver { step: step.to_owned() }
}

#[test]
fn a_wait_arms_its_timer_and_the_next_step_starts_when_it_fires() {
    let mut harness = Harness::start(COOL_DOWN, json!({}), 1_000);
    harness.succeed(1_100, "fetch", None, 1, json!({"retry_after_ms": 2_500}));
    assert_eq!(harness.armed(&wait_over("pause")), Some(3_600), "due 2,500 ms after the step started");
    assert!(harness.dispatched().is_empty(), "nothing runs while the wait goes on");
    assert_eq!(harness.step_status("pause"), StepStatus::Running);
    assert!(harness.run.armed_timers().contains(&(wait_over("pause"), 3_600)), "the state says the timer is armed");

    // A wait timer of a step that is not waiting (or of no step) changes nothing.
    assert_eq!(harness.fire(1_200, wait_over("fetch")), Applied::Ignored("timer not armed"));
    assert_eq!(harness.fire(1_200, wait_over("nope")), Applied::Ignored("timer not armed"));

    assert_eq!(harness.fire(3_600, wait_over("pause")), Applied::Accepted);
    let pause = harness.step("pause");
    assert_eq!((pause.status, pause.started_ms, pause.ended_ms), (StepStatus::Succeeded, Some(1_100), Some(3_600)));
    assert_eq!(pause.output, Some(json!({"waited_ms": 2_500})));
    let next = harness.dispatched();
    assert_eq!(next.len(), 1);
    assert_eq!(
        (next[0].attempt.clone(), (*next[0].input).clone()),
        (attempt("again", None, 1), json!({"waited_ms": 2_500}))
    );
    assert_eq!(harness.fire(3_601, wait_over("pause")), Applied::Ignored("timer not armed"), "fires once");

    assert_eq!(harness.succeed(3_700, "again", None, 1, json!("ok")), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds the wait");
}

#[test]
fn a_fixed_wait_and_a_wait_of_zero() {
    let yaml = r##"
name: waits
steps:
  - { kind: wait, id: fixed, duration_ms: 60000 }
  - { kind: wait, id: zero, duration: "input.none_ms" }
"##;
    let mut harness = Harness::start(yaml, json!({"none_ms": 0}), 5_000);
    assert_eq!(harness.armed(&wait_over("fixed")), Some(65_000));
    assert_eq!(harness.armed(&wait_over("zero")), None, "a wait of 0 ms arms nothing");
    assert_eq!(harness.step("zero").output, Some(json!({"waited_ms": 0})));
    assert_eq!(harness.fire(65_000, wait_over("fixed")), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.view().output, Some(json!({"fixed": {"waited_ms": 60_000}, "zero": {"waited_ms": 0}})));
}

#[test]
fn a_duration_that_is_not_a_number_of_milliseconds_fails_the_run() {
    for (bad, found) in [
        (json!("soon"), "gave a string (\"soon\")"),
        (json!(-5), "gave a number (-5)"),
        (json!(1e15), "gave a number (1"),
    ] {
        let mut harness = Harness::start(COOL_DOWN, json!({}), 0);
        harness.succeed(10, "fetch", None, 1, json!({ "retry_after_ms": bad }));
        let view = harness.run.view();
        assert_eq!(view.status, RunStatus::Failed, "{bad}");
        let error = view.error.expect("an error");
        assert_eq!(error.code, "expression_error", "{bad}");
        assert!(
            error.message.contains("step `pause`, field `duration`") && error.message.contains(found),
            "{bad}: {}",
            error.message
        );
        assert!(harness.run.armed_timers().is_empty());
    }
}

#[test]
fn a_run_that_ends_while_waiting_cancels_the_wait() {
    let mut harness = Harness::start(COOL_DOWN, json!({}), 0);
    harness.succeed(10, "fetch", None, 1, json!({"retry_after_ms": 100_000}));
    assert_eq!(harness.apply(20, Event::CancelRequested { reason: "enough".into() }), Applied::Accepted);
    assert!(harness.cancelled(&wait_over("pause")), "the driver forgets the wait's timer");
    assert_eq!(harness.step_status("pause"), StepStatus::Cancelled);
    assert!(harness.run.armed_timers().is_empty());
    assert_eq!(harness.fire(100_010, wait_over("pause")), Applied::Ignored("run already ended"));
}

#[test]
fn a_wait_until_a_time_given_as_unix_ms_or_rfc_3339() {
    let yaml = r##"
name: until
steps:
  - { kind: wait, id: at_ms, until: "input.at_ms" }
  - { kind: wait, id: at_text, until: "input.at_text" }
  - { kind: wait, id: past, until: "input.past" }
"##;
    // 2026-12-24T09:00:00Z is 1,798,102,800,000 ms.
    let start = 1_798_102_000_000;
    let input = json!({"at_ms": start + 5_000, "at_text": "2026-12-24T10:00:00+01:00", "past": "2020-01-01T00:00:00Z"});
    let mut harness = Harness::start(yaml, input, start);
    assert_eq!(harness.armed(&wait_over("at_ms")), Some(start + 5_000));
    assert_eq!(harness.armed(&wait_over("at_text")), Some(1_798_102_800_000), "the time's offset counts");
    assert_eq!(harness.armed(&wait_over("past")), None, "a time past goes on at once");
    assert_eq!(harness.step("past").output, Some(json!({"waited_ms": 0})));
    let before_1970 = json!({"at_ms": start, "at_text": start, "past": "0001-01-01T00:00:00Z"});
    let early = Harness::start(yaml, before_1970, start);
    assert_eq!(early.step("past").output, Some(json!({"waited_ms": 0})), "a time before 1970 is past too");
    assert_eq!(harness.fire(start + 5_000, wait_over("at_ms")), Applied::Accepted);
    assert_eq!(harness.step("at_ms").output, Some(json!({"waited_ms": 5_000})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds the waits");
    assert_eq!(harness.fire(1_798_102_800_000, wait_over("at_text")), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Succeeded);

    let negative = Harness::start(yaml, json!({"at_ms": start, "at_text": start, "past": -1}), start);
    assert_eq!(negative.step("past").output, Some(json!({"waited_ms": 0})), "a number before 1970 is past too");
    for (bad, found) in [(json!("tomorrow"), "gave a string"), (json!(true), "gave a boolean"), (json!(u64::MAX), "")] {
        let harness = Harness::start(yaml, json!({"at_ms": bad, "at_text": 0, "past": 0}), start);
        let error = harness.run.view().error.expect("the run failed");
        assert_eq!(error.code, "expression_error", "{bad}");
        assert!(error.message.contains("field `until`") && error.message.contains(found), "{bad}: {}", error.message);
        assert!(error.message.contains("RFC 3339"), "says what it takes: {}", error.message);
        assert!(harness.run.armed_timers().is_empty());
    }
}
