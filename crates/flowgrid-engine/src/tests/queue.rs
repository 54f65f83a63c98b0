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

#[test]
fn a_delayed_run_holds_its_steps_until_its_start_time_and_its_timeout_counts_from_then() {
    let mut harness = Harness::start_delayed(CHAIN, json!({}), 5, 1_000);
    assert!(harness.dispatched().is_empty(), "nothing starts before its time: {:?}", harness.effects);
    assert_eq!(harness.armed(&TimerKey::StartDue), Some(1_000));
    assert_eq!(harness.armed(&TimerKey::RunTimeout), Some(11_000), "10 s from its start time");
    let delayed = harness.run.delayed().expect("delayed");
    assert_eq!((delayed.until_ms, delayed.held), (1_000, vec!["fetch".to_owned()]));
    assert_eq!(harness.run.view().delayed, harness.run.delayed());
    assert!(harness.run.armed_timers().contains(&(TimerKey::StartDue, 1_000)));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the start record says when it starts");

    // Paused meanwhile: the start time hands the held step to the pause.
    harness.apply(10, Event::PauseRequested { reason: "not yet".to_owned() });
    assert_eq!(harness.fire(1_000, TimerKey::StartDue), Applied::Accepted);
    assert!(harness.dispatched().is_empty() && harness.run.delayed().is_none());
    assert_eq!(harness.fire(1_001, TimerKey::StartDue), Applied::Ignored("timer not armed"));
    harness.apply(1_100, Event::ResumeRequested { reason: "go".to_owned() });
    assert_eq!(harness.dispatched_names(), vec!["fetch".to_owned()]);
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
    assert!(replayed.armed_timers().contains(&(TimerKey::RunTimeout, 11_000)), "{:?}", replayed.armed_timers());
}

#[test]
fn a_delayed_run_of_a_limited_flow_queues_only_at_its_start_time_and_a_cancel_clears_it() {
    let limited = CHAIN.replace("timeout_ms: 10000", "concurrency: { max: 1 }");
    let mut harness = Harness::start_delayed(&limited, json!({}), 0, 500);
    assert!(!harness.run.is_queued(), "no slot asked for while it waits");
    harness.fire(500, TimerKey::StartDue);
    let queued = harness.run.queued().expect("queued at its start time");
    assert_eq!((queued.since_ms, queued.held), (500, vec!["fetch".to_owned()]));
    harness.apply(600, Event::Admitted);
    assert_eq!(harness.dispatched_names(), vec!["fetch".to_owned()]);

    let mut harness = Harness::start_delayed(CHAIN, json!({}), 0, 500);
    assert_eq!(harness.apply(100, Event::CancelRequested { reason: "never mind".into() }), Applied::Accepted);
    assert!(harness.cancelled(&TimerKey::StartDue), "the driver forgets its start time");
    assert_eq!((harness.run.status(), harness.run.delayed()), (RunStatus::Cancelled, None));
    assert!(harness.run.armed_timers().is_empty());
    // A start time already past starts the run at once.
    let harness = Harness::start_delayed(CHAIN, json!({}), 600, 500);
    assert_eq!((harness.dispatched_names(), harness.run.delayed()), (vec!["fetch".to_owned()], None));
}

#[test]
fn a_run_cancelled_before_its_start_time_and_redriven_waits_for_it_again() {
    let redrive = |queued| Event::Redriven { reason: "after all".to_owned(), from: Vec::new(), queued };
    let limited = CHAIN.replace("timeout_ms: 10000", "timeout_ms: 10000\nconcurrency: { max: 1 }");
    let mut harness = Harness::start_delayed(&limited, json!({}), 0, 1_000);
    harness.apply(100, Event::CancelRequested { reason: "not so soon".into() });
    assert_eq!(harness.apply(200, redrive(true)), Applied::Accepted);
    assert!(harness.dispatched().is_empty(), "nothing starts before its time: {:?}", harness.effects);
    assert!(!harness.run.is_queued(), "a limited flow asks for its slot at the start time");
    let delayed = harness.run.delayed().expect("waits again");
    assert_eq!((delayed.until_ms, delayed.held), (1_000, vec!["fetch".to_owned()]));
    assert_eq!(harness.armed(&TimerKey::StartDue), Some(1_000));
    assert_eq!(harness.armed(&TimerKey::RunTimeout), Some(11_000), "the timeout counts from the start time");
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the redrive replays to the same wait");
    harness.fire(1_000, TimerKey::StartDue);
    assert!(harness.run.is_queued() && harness.run.delayed().is_none());
    harness.apply(1_001, Event::Admitted);
    assert_eq!(harness.dispatched_names(), vec!["fetch".to_owned()]);

    // Redriven after its start time: it goes at once.
    let mut harness = Harness::start_delayed(CHAIN, json!({}), 0, 500);
    harness.apply(100, Event::CancelRequested { reason: "not so soon".into() });
    harness.apply(600, redrive(false));
    assert_eq!((harness.dispatched_names(), harness.run.delayed()), (vec!["fetch".to_owned()], None));
    assert_eq!(harness.armed(&TimerKey::RunTimeout), Some(10_600));
}
