//! Queued runs: a run its flow's concurrency limit has no room for holds its steps until
//! it is admitted.

use serde_json::json;

use super::replay::replay;
use super::support::{attempt, Harness};
use crate::{Applied, Event, RunStatus, StepStatus, TimerKey};

const CHAIN: &str = r##"
name: chain
timeout_ms: 10000
steps:
  - { kind: task, id: fetch, pool: cpu, task: fetch }
  - { kind: transform, id: count, after: [fetch], output: "len(steps.fetch.output)" }
"##;

#[test]
fn a_queued_run_holds_its_first_steps_until_it_is_admitted() {
    let mut harness = Harness::start_queued(CHAIN, json!({}), 5);
    assert!(harness.dispatched().is_empty(), "nothing starts while queued: {:?}", harness.effects);
    assert!(harness.armed(&TimerKey::RunTimeout).is_some(), "its timeout counts from its start");
    let queued = harness.run.queued().expect("queued");
    assert_eq!((queued.since_ms, queued.held), (5, vec!["fetch".to_owned()]));
    assert_eq!(harness.run.view().queued, harness.run.queued());
    assert_eq!(harness.step_status("fetch"), StepStatus::Pending);
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the start record says it was queued");

    assert_eq!(harness.apply(20, Event::Admitted), Applied::Accepted);
    assert_eq!((harness.run.queued(), harness.dispatched_names()), (None, vec!["fetch".to_owned()]));
    assert_eq!(harness.apply(21, Event::Admitted), Applied::Ignored("the run is not queued"));
    harness.succeed(30, "fetch", None, 1, json!([1, 2]));
    assert_eq!(harness.run.view().output, Some(json!({"count": 2})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_run_paused_while_queued_starts_its_steps_on_the_resume_after_its_admission() {
    let mut harness = Harness::start_queued(CHAIN, json!({}), 0);
    harness.apply(10, Event::PauseRequested { reason: "hold on".to_owned() });
    assert_eq!(harness.apply(20, Event::Admitted), Applied::Accepted);
    assert!(harness.dispatched().is_empty(), "admitted but paused: {:?}", harness.effects);
    assert_eq!(harness.run.paused().map(|paused| paused.held), Some(vec!["fetch".to_owned()]));
    harness.apply(30, Event::ResumeRequested { reason: "go".to_owned() });
    assert_eq!(harness.dispatched()[0].attempt, attempt("fetch", None, 1));

    // Resumed before its admission: it still waits for the admission.
    let mut harness = Harness::start_queued(CHAIN, json!({}), 0);
    harness.apply(10, Event::PauseRequested { reason: "hold on".to_owned() });
    harness.apply(20, Event::ResumeRequested { reason: "go".to_owned() });
    assert!(harness.dispatched().is_empty() && harness.run.is_queued(), "{:?}", harness.effects);
    harness.apply(30, Event::Admitted);
    assert_eq!(harness.dispatched_names(), vec!["fetch".to_owned()]);
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_queued_run_is_cancelled_or_times_out_as_any_and_a_queued_redrive_waits_again() {
    let mut harness = Harness::start_queued(CHAIN, json!({}), 0);
    harness.apply(10, Event::CancelRequested { reason: "not needed".to_owned() });
    assert_eq!((harness.run.status(), harness.run.queued()), (RunStatus::Cancelled, None));
    assert_eq!(harness.step_status("fetch"), StepStatus::Cancelled, "the held step is cancelled");
    assert_eq!(harness.apply(11, Event::Admitted), Applied::Ignored("run already ended"));

    let redrive = |queued| Event::Redriven { reason: "again".to_owned(), from: Vec::new(), queued };
    assert_eq!(harness.apply(100, redrive(true)), Applied::Accepted);
    assert!(harness.dispatched().is_empty(), "{:?}", harness.effects);
    assert_eq!(harness.run.queued().map(|queued| queued.since_ms), Some(100));
    assert_eq!(harness.fire(10_100, TimerKey::RunTimeout), Applied::Accepted);
    assert_eq!((harness.run.status(), harness.run.is_queued()), (RunStatus::TimedOut, false));
    harness.apply(20_000, redrive(false));
    assert_eq!(harness.dispatched()[0].attempt, attempt("fetch", None, 1), "not queued: starts at once");
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}
