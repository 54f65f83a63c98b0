//! Pause and resume: a paused run starts no step; what it started goes on.

use serde_json::json;

use super::replay::replay;
use super::support::{attempt, Harness};
use crate::{Applied, Event, RunStatus, StepStatus, TimerKey};

const CHAIN: &str = r##"
name: chain
timeout_ms: 10000
steps:
  - { kind: task, id: fetch, pool: cpu, task: fetch }
  - { kind: map, id: encode, after: [fetch], items: "steps.fetch.output", pool: cpu, task: encode, max_concurrency: 1 }
  - { kind: transform, id: count, after: [encode], output: "len(steps.encode.output)" }
"##;

fn pause(harness: &mut Harness, now: u64) -> Applied {
    harness.apply(now, Event::PauseRequested { reason: "downstream is down".to_owned() })
}

fn resume(harness: &mut Harness, now: u64) -> Applied {
    harness.apply(now, Event::ResumeRequested { reason: "downstream is back".to_owned() })
}

#[test]
fn a_paused_run_holds_the_steps_that_become_ready_and_starts_them_when_resumed() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    assert_eq!(pause(&mut harness, 10), Applied::Accepted);
    assert!(harness.effects.is_empty(), "a pause itself does nothing: {:?}", harness.effects);
    assert_eq!(pause(&mut harness, 11), Applied::Ignored("the run is paused already"));
    let paused = harness.run.paused().expect("paused");
    assert_eq!((paused.since_ms, paused.reason.as_str()), (10, "downstream is down"));

    // The attempt out when it was paused finishes; the step after it waits.
    assert_eq!(harness.succeed(20, "fetch", None, 1, json!(["a", "b"])), Applied::Accepted);
    assert!(harness.dispatched().is_empty(), "{:?}", harness.effects);
    assert_eq!(harness.step_status("encode"), StepStatus::Pending);
    assert_eq!(harness.run.paused().map(|paused| paused.held), Some(vec!["encode".to_owned()]));
    assert_eq!(harness.run.view().paused, harness.run.paused());
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds a paused run with what it holds");

    assert_eq!(resume(&mut harness, 30), Applied::Accepted);
    assert_eq!(harness.run.paused(), None);
    assert_eq!(harness.dispatched_names(), vec!["encode[0]"]);
    assert_eq!(resume(&mut harness, 31), Applied::Ignored("the run is not paused"));

    // A step that started before the pause goes on with its items.
    pause(&mut harness, 40);
    harness.succeed(50, "encode", Some(0), 1, json!("A"));
    assert_eq!(harness.dispatched_names(), vec!["encode[1]"], "a started map goes on while paused");
    harness.succeed(60, "encode", Some(1), 1, json!("B"));
    assert_eq!(harness.step_status("count"), StepStatus::Pending, "an engine-side step waits too");
    assert_eq!(harness.run.status(), RunStatus::Running);
    resume(&mut harness, 70);
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.view().output, Some(json!({"count": 2})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_paused_run_still_times_out_and_is_cancelled_and_its_redrive_is_not_paused() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    pause(&mut harness, 10);
    harness.succeed(20, "fetch", None, 1, json!(["a"]));
    assert_eq!(harness.fire(10_000, TimerKey::RunTimeout), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::TimedOut);
    assert_eq!(harness.run.paused(), None, "an ended run is not paused");
    assert_eq!(harness.step_status("encode"), StepStatus::Cancelled, "the held step is cancelled");
    assert_eq!(pause(&mut harness, 10_001), Applied::Ignored("run already ended"));

    harness.apply(20_000, Event::Redriven { reason: "again".to_owned(), from: Vec::new(), queued: false });
    assert_eq!(harness.dispatched()[0].attempt, attempt("encode", Some(0), 1));
    pause(&mut harness, 20_010);
    harness.apply(20_020, Event::CancelRequested { reason: "enough".to_owned() });
    assert_eq!((harness.run.status(), harness.run.paused()), (RunStatus::Cancelled, None));
}

#[test]
fn a_run_is_paused_a_bounded_number_of_times() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    for round in 0..flowgrid_model::limits::PAUSES_MAX {
        let now = u64::from(round) * 2 + 1;
        assert_eq!(pause(&mut harness, now), Applied::Accepted, "pause {round}");
        assert_eq!(resume(&mut harness, now + 1), Applied::Accepted);
    }
    assert_eq!(harness.run.pauses(), flowgrid_model::limits::PAUSES_MAX);
    assert_eq!(pause(&mut harness, 9_000), Applied::Ignored("the run was paused the most times a run may be"));
    assert_eq!(harness.run.paused(), None);
}
