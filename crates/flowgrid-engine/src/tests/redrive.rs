//! Redrive: an ended run goes again from the steps that did not succeed.

use flowgrid_model::limits::REDRIVES_MAX;
use flowgrid_model::{ParentRef, RunId};
use serde_json::json;

use super::replay::replay;
use super::support::{attempt, error, Harness, RUN};
use crate::{Applied, Effect, Event, RedriveRefused, RunStatus, StepStatus, TimerKey};

const CHAIN: &str = r##"
name: chain
timeout_ms: 10000
steps:
  - { kind: task, id: fetch, pool: cpu, task: fetch, retry: { max_attempts: 2, initial_backoff_ms: 100, jitter: 0 } }
  - { kind: task, id: encode, after: [fetch], pool: cpu, task: encode, input: "steps.fetch.output" }
  - { kind: task, id: store, after: [encode], pool: cpu, task: store, input: "steps.encode.output" }
"##;

fn redrive(harness: &mut Harness, now: u64) -> Applied {
    harness.apply(now, Event::Redriven { reason: "fixed the encoder".to_owned(), from: Vec::new(), queued: false })
}

#[test]
fn a_failed_run_goes_again_from_its_failed_step_and_keeps_what_succeeded() {
    let mut harness = Harness::start(CHAIN, json!({"url": "a"}), 1_000);
    harness.succeed(1_010, "fetch", None, 1, json!({"bytes": 7}));
    assert_eq!(harness.fail(1_020, "encode", None, 1, error("bad_codec", false)), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Failed);
    assert_eq!(harness.run.redrive_refused(&[]), None);

    assert_eq!(redrive(&mut harness, 5_000), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Running);
    assert_eq!(harness.run.error(), None);
    assert_eq!(harness.run.ended_ms(), None);
    let view = harness.run.view();
    assert_eq!(view.redriven.map(|redriven| (redriven.times, redriven.last_ms)), Some((1, 5_000)));
    assert_eq!(harness.step_status("fetch"), StepStatus::Succeeded, "a step that succeeded stays");
    assert_eq!(harness.step("fetch").output, Some(json!({"bytes": 7})));
    assert_eq!(harness.step_status("store"), StepStatus::Pending, "a step never reached waits again");
    // The failed step runs again, with the next attempt number and the same input.
    let dispatched = harness.dispatched();
    assert_eq!(dispatched.len(), 1, "{:?}", harness.effects);
    assert_eq!(dispatched[0].attempt, attempt("encode", None, 2));
    assert_eq!(*dispatched[0].input, json!({"bytes": 7}));
    assert_eq!(harness.step("encode").attempts, 2, "attempts count over every round");
    // The run's timeout counts from the redrive.
    assert_eq!(harness.armed(&TimerKey::RunTimeout), Some(15_000));
    assert!(harness.run.armed_timers().contains(&(TimerKey::RunTimeout, 15_000)));

    // A late result of the attempt from before is not the new attempt's.
    let late = harness.succeed(5_010, "encode", None, 1, json!("late"));
    assert_eq!(late, Applied::Ignored("attempt not open"));
    harness.succeed(5_020, "encode", None, 2, json!({"encoded": true}));
    harness.succeed(5_030, "store", None, 1, json!("stored"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.finished(), vec![RunStatus::Failed, RunStatus::Succeeded]);
    assert_eq!(harness.run.redrive_refused(&[]), Some(RedriveRefused::Succeeded));

    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds the redriven run");
}

#[test]
fn retries_count_anew_after_a_redrive() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    harness.fail(10, "fetch", None, 1, error("busy", true));
    harness.fire(110, TimerKey::RetryDue { attempt: attempt("fetch", None, 2) });
    harness.fail(120, "fetch", None, 2, error("busy", true));
    assert_eq!(harness.run.status(), RunStatus::Failed, "two attempts, the most the policy allows");

    redrive(&mut harness, 1_000);
    assert_eq!(harness.dispatched()[0].attempt, attempt("fetch", None, 3));
    harness.fail(1_010, "fetch", None, 3, error("busy", true));
    assert_eq!(harness.run.status(), RunStatus::Running, "the redriven step has its own two attempts");
    let retry = TimerKey::RetryDue { attempt: attempt("fetch", None, 4) };
    assert_eq!(harness.armed(&retry), Some(1_110), "the first backoff again");
    harness.fire(1_110, retry);
    assert_eq!(harness.dispatched()[0].attempt, attempt("fetch", None, 4));
}

#[test]
fn a_timed_out_or_cancelled_run_restarts_the_steps_it_cut_off() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    harness.succeed(10, "fetch", None, 1, json!(1));
    assert_eq!(harness.fire(10_000, TimerKey::RunTimeout), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::TimedOut);
    assert_eq!(harness.step_status("encode"), StepStatus::Cancelled);
    redrive(&mut harness, 20_000);
    assert_eq!(harness.dispatched_names(), vec!["encode"]);
    assert_eq!(harness.armed(&TimerKey::RunTimeout), Some(30_000));

    harness.apply(20_100, Event::CancelRequested { reason: "operator".to_owned() });
    assert_eq!(harness.run.status(), RunStatus::Cancelled);
    redrive(&mut harness, 21_000);
    assert_eq!(harness.dispatched()[0].attempt, attempt("encode", None, 3));
    assert_eq!(harness.run.view().redriven.map(|redriven| redriven.times), Some(2));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
    assert_eq!(replayed.armed_timers(), harness.run.armed_timers());
}

#[test]
fn a_run_that_goes_or_succeeded_is_not_redriven() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    assert_eq!(harness.run.redrive_refused(&[]), Some(RedriveRefused::Going));
    assert_eq!(redrive(&mut harness, 5), Applied::Ignored("the run cannot be redriven"));
    assert_eq!(harness.step("fetch").attempts, 1);
}

#[test]
fn a_run_is_redriven_a_bounded_number_of_times() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    for round in 0..REDRIVES_MAX {
        let now = u64::from(round) * 10 + 1;
        harness.apply(now, Event::CancelRequested { reason: "again".to_owned() });
        assert_eq!(redrive(&mut harness, now + 1), Applied::Accepted, "redrive {round}");
    }
    harness.apply(1_000_000, Event::CancelRequested { reason: "again".to_owned() });
    assert_eq!(harness.run.redrive_refused(&[]), Some(RedriveRefused::TooOften { times: REDRIVES_MAX }));
    assert_eq!(redrive(&mut harness, 1_000_001), Applied::Ignored("the run cannot be redriven"));
}

const CAUGHT: &str = r##"
name: caught
steps:
  - kind: task
    id: fetch
    pool: cpu
    task: fetch
    catch: [{ errors: [missing], next: placeholder }]
  - { kind: transform, id: placeholder, output: '"none"' }
  - { kind: task, id: publish, after: [fetch], pool: cpu, task: publish }
  - { kind: task, id: notify, pool: cpu, task: notify }
"##;

#[test]
fn a_caught_failure_stays_caught_and_only_the_failed_branch_runs_again() {
    let mut harness = Harness::start(CAUGHT, json!({}), 0);
    harness.fail(10, "fetch", None, 1, error("missing", false));
    assert_eq!(harness.step_status("placeholder"), StepStatus::Succeeded);
    harness.fail(20, "notify", None, 1, error("smtp_down", false));
    assert_eq!(harness.run.status(), RunStatus::Failed);

    redrive(&mut harness, 100);
    assert_eq!(harness.dispatched_names(), vec!["notify"], "the caught step and its catch stay");
    let fetch = harness.step("fetch");
    assert_eq!((fetch.status, fetch.caught), (StepStatus::Failed, true));
    assert_eq!(harness.step_status("publish"), StepStatus::Skipped);
    harness.succeed(110, "notify", None, 2, json!("sent"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
}

const MAP: &str = r##"
name: fan
timeout_ms: 1000
steps:
  - { kind: map, id: each, items: "input", pool: cpu, task: work, max_concurrency: 2 }
"##;

#[test]
fn a_failed_map_runs_again_only_its_items_that_did_not_succeed() {
    let mut harness = Harness::start(MAP, json!(["a", "b", "c", "d"]), 0);
    harness.succeed(10, "each", Some(0), 1, json!("A"));
    harness.fail(20, "each", Some(1), 1, error("broken", false));
    assert_eq!(harness.run.status(), RunStatus::Failed, "item 2 was active, item 3 never started");

    redrive(&mut harness, 100);
    let items = harness.step("each").items.expect("a map has counts");
    assert_eq!((items.succeeded, items.running), (1, 2), "item 0 is kept");
    let attempts: Vec<_> = harness.dispatched().into_iter().map(|dispatch| dispatch.attempt).collect();
    assert_eq!(attempts, vec![attempt("each", Some(1), 4), attempt("each", Some(2), 4)]);
    assert_eq!(harness.succeed(110, "each", Some(1), 1, json!("late")), Applied::Ignored("attempt not open"));
    harness.succeed(120, "each", Some(1), 4, json!("B"));
    assert_eq!(harness.dispatched_names(), vec!["each[3]"]);
    harness.succeed(130, "each", Some(2), 4, json!("C"));
    harness.succeed(140, "each", Some(3), 4, json!("D"));
    assert_eq!(harness.run.view().output, Some(json!({"each": ["A", "B", "C", "D"]})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_map_whose_output_mapping_failed_keeps_its_items_for_a_redrive() {
    // The mapping reads a field the items' outputs (strings) do not have.
    let definition = MAP.replace("max_concurrency: 2 }", "max_concurrency: 2, output: \"result[0].size\" }");
    let mut harness = Harness::start(&definition, json!(["a", "b"]), 0);
    harness.succeed(10, "each", Some(0), 1, json!("A"));
    harness.succeed(20, "each", Some(1), 1, json!("B"));
    assert_eq!(harness.run.status(), RunStatus::Failed, "{:?}", harness.run.view().error);
    assert_eq!(harness.step("each").items.map(|items| items.succeeded), Some(2), "{:?}", harness.step("each"));

    redrive(&mut harness, 100);
    assert_eq!(harness.dispatched_names(), Vec::<String>::new(), "no item runs again");
    assert_eq!(harness.run.status(), RunStatus::Failed, "the same items fail the same mapping");
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_map_cut_off_by_the_run_timeout_keeps_its_items_that_succeeded() {
    let mut harness = Harness::start(MAP, json!(["a", "b", "c"]), 0);
    harness.succeed(10, "each", Some(1), 1, json!("B"));
    harness.fire(1_000, TimerKey::RunTimeout);
    assert_eq!(harness.run.status(), RunStatus::TimedOut);
    redrive(&mut harness, 2_000);
    assert_eq!(harness.dispatched_names(), vec!["each[0]", "each[2]"]);
    harness.succeed(2_010, "each", Some(0), 4, json!("A"));
    harness.succeed(2_020, "each", Some(2), 4, json!("C"));
    assert_eq!(harness.run.view().output, Some(json!({"each": ["A", "B", "C"]})));
}

const PARENT: &str = r##"
name: parent
steps:
  - { kind: subflow, id: encode, flow: transcode }
"##;

#[test]
fn a_redriven_subflow_step_starts_a_child_of_its_own() {
    let run_id = RunId(RUN.into());
    let first = ParentRef::child_run_id("transcode", &run_id, "encode", None, 0);
    let mut harness = Harness::start(PARENT, json!({}), 0);
    let ended = |child: &RunId, status| Event::ChildEnded {
        step: "encode".to_owned(),
        item: None,
        child: child.clone(),
        status,
        output: Some(json!({"size": 1})),
        error: None,
        refused: false,
        keeps_round: false,
    };
    harness.apply(10, ended(&first, RunStatus::Failed));
    assert_eq!(harness.run.status(), RunStatus::Failed);

    redrive(&mut harness, 100);
    let second = ParentRef::child_run_id("transcode", &run_id, "encode", None, 1);
    assert_ne!(first, second);
    let start = harness
        .effects
        .iter()
        .find_map(|effect| match effect {
            Effect::StartChild(start) => Some(start.clone()),
            _ => None,
        })
        .expect("a new child is asked for");
    assert_eq!((start.child.clone(), start.round), (second.clone(), 1));
    assert_eq!(harness.step("encode").child_run, Some(second.clone()));
    assert_eq!(harness.run.open_child_starts(), vec![start]);
    assert_eq!(harness.apply(110, ended(&first, RunStatus::Succeeded)), Applied::Ignored("not the child of this step"));
    harness.apply(120, ended(&second, RunStatus::Succeeded));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);

    let mut child = Harness::start(PARENT, json!({}), 0);
    let parent = ParentRef { run_id: RunId("p".into()), step: "s".into(), item: None, depth: 1, round: 0 };
    child.run.set_parent(parent.clone());
    child.apply(5, Event::CancelRequested { reason: "parent ended".to_owned() });
    assert_eq!(child.run.redrive_refused(&[]), Some(RedriveRefused::Child { parent }));
}

const EACH_CHILD: &str = r##"
name: parent
steps:
  - { kind: subflow, id: each, flow: transcode, items: "input" }
"##;

#[test]
fn a_redriven_subflow_step_with_items_keeps_its_children_that_succeeded_and_starts_a_new_round_of_the_others() {
    let run_id = RunId(RUN.into());
    let child = |item, round| ParentRef::child_run_id("transcode", &run_id, "each", Some(item), round);
    let ended = |item, round, status| Event::ChildEnded {
        step: "each".to_owned(),
        item: Some(item),
        child: child(item, round),
        status,
        output: Some(json!(item)),
        error: None,
        refused: false,
        keeps_round: false,
    };
    let mut harness = Harness::start(EACH_CHILD, json!(["a", "b"]), 0);
    harness.apply(10, ended(0, 0, RunStatus::Succeeded));
    harness.apply(20, ended(1, 0, RunStatus::Failed));
    assert_eq!(harness.run.status(), RunStatus::Failed);

    redrive(&mut harness, 100);
    let asked: Vec<_> = harness
        .effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::StartChild(start) => Some((start.item, start.round, start.child.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(asked, vec![(Some(1), 2, child(1, 2))], "item 0's child succeeded; the round is the children so far");
    let each = harness.step("each");
    assert_eq!((each.child_round, each.items.map(|items| items.succeeded)), (2, Some(1)));
    assert_eq!(harness.apply(110, ended(1, 0, RunStatus::Succeeded)), Applied::Ignored("not the child of this step"));
    let kept = Applied::Ignored("the subflow step does not wait for that child");
    assert_eq!(harness.apply(115, ended(0, 2, RunStatus::Succeeded)), kept);
    harness.apply(130, ended(1, 2, RunStatus::Succeeded));
    assert_eq!(harness.run.view().output, Some(json!({"each": [0, 1]})), "the kept output and the new one");
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

fn redrive_from(harness: &mut Harness, now: u64, from: &[&str]) -> Applied {
    let from = from.iter().map(|step| (*step).to_owned()).collect();
    harness.apply(now, Event::Redriven { reason: "new model".to_owned(), from, queued: false })
}

#[test]
fn a_succeeded_run_goes_again_from_a_named_step_and_every_step_after_it() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    harness.succeed(10, "fetch", None, 1, json!("page"));
    harness.succeed(20, "encode", None, 1, json!("v1"));
    harness.succeed(30, "store", None, 1, json!("stored v1"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.redrive_refused(&[]), Some(RedriveRefused::Succeeded));
    assert_eq!(harness.run.redrive_refused(&["encode".to_owned()]), None);

    assert_eq!(redrive_from(&mut harness, 1_000, &["encode"]), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Running);
    assert_eq!(harness.run.view().output, None);
    assert_eq!(harness.step("fetch").output, Some(json!("page")), "the step before stays");
    let store = harness.step("store");
    assert_eq!((store.status, store.output, store.attempts), (StepStatus::Pending, None, 1));
    let dispatched = harness.dispatched();
    assert_eq!(dispatched.len(), 1, "{:?}", harness.effects);
    assert_eq!(dispatched[0].attempt, attempt("encode", None, 2));
    assert_eq!(*dispatched[0].input, json!("page"), "it reads the output of the step before again");
    assert_eq!(harness.succeed(1_005, "store", None, 1, json!("late")), Applied::Ignored("step not running"));

    harness.succeed(1_010, "encode", None, 2, json!("v2"));
    let dispatched = harness.dispatched();
    assert_eq!(
        (dispatched[0].attempt.clone(), (*dispatched[0].input).clone()),
        (attempt("store", None, 2), json!("v2"))
    );
    harness.succeed(1_020, "store", None, 2, json!("stored v2"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.view().output, Some(json!({"store": "stored v2"})));
    assert_eq!(harness.finished(), vec![RunStatus::Succeeded, RunStatus::Succeeded]);
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds the run redriven from a step");
}

#[test]
fn a_failed_run_redriven_from_an_earlier_step_runs_it_and_what_failed_after_it() {
    let mut harness = Harness::start(CHAIN, json!({}), 0);
    harness.succeed(10, "fetch", None, 1, json!("stale page"));
    harness.fail(20, "encode", None, 1, error("bad_page", false));
    assert_eq!(harness.run.status(), RunStatus::Failed);

    redrive_from(&mut harness, 100, &["fetch"]);
    assert_eq!(harness.dispatched()[0].attempt, attempt("fetch", None, 2));
    assert_eq!(harness.step_status("encode"), StepStatus::Pending, "it waits for the step before again");
    harness.succeed(110, "fetch", None, 2, json!("fresh page"));
    assert_eq!(*harness.dispatched()[0].input, json!("fresh page"));
    assert_eq!(harness.dispatched()[0].attempt, attempt("encode", None, 2));
}

const ROUTED: &str = r##"
name: routed
steps:
  - { kind: task, id: measure, pool: cpu, task: measure }
  - kind: choice
    id: route
    after: [measure]
    choices:
      - when: "steps.measure.output > 10"
        next: big
    default: small
  - { kind: task, id: big, pool: gpu, task: big }
  - { kind: task, id: small, pool: cpu, task: small }
  - { kind: task, id: report, after: [big, small], pool: cpu, task: report }
"##;

#[test]
fn steps_started_anew_see_their_dependencies_as_they_resolved() {
    let mut harness = Harness::start(ROUTED, json!({}), 0);
    harness.succeed(10, "measure", None, 1, json!(3));
    assert_eq!(harness.dispatched_names(), vec!["small"]);
    harness.succeed(20, "small", None, 1, json!("s1"));
    harness.succeed(30, "report", None, 1, json!("r1"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step_status("big"), StepStatus::Skipped);

    // The branch the choice took stays taken; the step after both branches waits for it.
    redrive_from(&mut harness, 100, &["small"]);
    assert_eq!(harness.dispatched_names(), vec!["small"]);
    assert_eq!(harness.step_status("report"), StepStatus::Pending);
    assert_eq!(harness.step_status("big"), StepStatus::Skipped, "the branch not taken stays skipped");
    harness.succeed(110, "small", None, 2, json!("s2"));
    assert_eq!(harness.dispatched_names(), vec!["report"]);
    harness.succeed(120, "report", None, 2, json!("r2"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);

    // A step the choice skipped is refused: it would be skipped again.
    let refused = harness.run.redrive_refused(&["big".to_owned()]);
    assert_eq!(refused, Some(RedriveRefused::Skipped { step: "big".to_owned() }));
    assert_eq!(redrive_from(&mut harness, 200, &["big"]), Applied::Ignored("the run cannot be redriven"));
    let unknown = harness.run.redrive_refused(&["nope".to_owned()]);
    assert_eq!(unknown, Some(RedriveRefused::NoSuchStep { step: "nope".to_owned() }));

    // From the step before the choice, the choice decides again on the new output.
    redrive_from(&mut harness, 300, &["measure"]);
    assert_eq!(harness.step_status("big"), StepStatus::Pending);
    harness.succeed(310, "measure", None, 2, json!(50));
    assert_eq!(harness.dispatched_names(), vec!["big"]);
    assert_eq!(harness.step_status("small"), StepStatus::Skipped);
    harness.succeed(320, "big", None, 1, json!("b1"));
    harness.succeed(330, "report", None, 3, json!("r3"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.view().redriven.map(|redriven| redriven.times), Some(2));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

/// [`ROUTED`] whose small branch is a `succeed` step that ends the run early, with a step of
/// its own beside.
fn early_exit() -> String {
    let early = ROUTED.replace("{ kind: task, id: small, pool: cpu, task: small }", "{ kind: succeed, id: small }");
    early + "  - { kind: task, id: side, pool: cpu, task: side }\n"
}

#[test]
fn a_step_after_a_succeed_step_that_ended_the_run_goes_again() {
    let mut harness = Harness::start(&early_exit(), json!({}), 0);
    harness.succeed(10, "measure", None, 1, json!(3));
    assert_eq!(harness.run.status(), RunStatus::Succeeded, "the small branch ends the run");
    assert_eq!(harness.step_status("report"), StepStatus::Cancelled);
    assert_eq!(harness.step_status("side"), StepStatus::Cancelled);

    // From the step after the succeed step: it runs, the succeed step counted as resolved;
    // the step the end cut off, which it does not wait for, was not reached and stays.
    redrive_from(&mut harness, 100, &["report"]);
    assert_eq!(harness.dispatched_names(), vec!["report"]);
    assert_eq!(harness.step_status("side"), StepStatus::Cancelled);
    harness.succeed(110, "report", None, 1, json!("j"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);

    // From the step before the choice: the choice decides again and the run goes through.
    redrive_from(&mut harness, 200, &["measure"]);
    harness.succeed(210, "measure", None, 2, json!(50));
    assert_eq!(harness.dispatched_names(), vec!["big"]);
    harness.succeed(220, "big", None, 1, json!("b"));
    assert_eq!(harness.dispatched_names(), vec!["report"]);
    harness.succeed(230, "report", None, 2, json!("j2"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_caught_failure_redriven_from_its_step_runs_it_again_and_its_catch_only_if_it_fails_again() {
    let mut harness = Harness::start(CAUGHT, json!({}), 0);
    harness.fail(10, "fetch", None, 1, error("missing", false));
    harness.succeed(20, "notify", None, 1, json!("sent"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step_status("placeholder"), StepStatus::Succeeded);

    redrive_from(&mut harness, 100, &["fetch"]);
    assert_eq!(harness.dispatched_names(), vec!["fetch"], "the other branch stays as it ended");
    let fetch = harness.step("fetch");
    assert_eq!((fetch.status, fetch.caught, fetch.error), (StepStatus::Running, false, None));
    assert_eq!(harness.step_status("placeholder"), StepStatus::Pending);
    harness.succeed(110, "fetch", None, 2, json!("found"));
    assert_eq!(harness.step_status("placeholder"), StepStatus::Skipped, "no failure to catch this time");
    assert_eq!(harness.dispatched_names(), vec!["publish"]);
    harness.succeed(120, "publish", None, 1, json!("published"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
}

#[test]
fn a_map_redriven_from_its_step_runs_every_item_again() {
    let mut harness = Harness::start(MAP, json!(["a", "b"]), 0);
    harness.succeed(10, "each", Some(0), 1, json!("A"));
    harness.succeed(20, "each", Some(1), 1, json!("B"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);

    redrive_from(&mut harness, 100, &["each"]);
    let attempts: Vec<_> = harness.dispatched().into_iter().map(|dispatch| dispatch.attempt).collect();
    assert_eq!(attempts, vec![attempt("each", Some(0), 3), attempt("each", Some(1), 3)]);
    let items = harness.step("each").items.expect("a map has counts");
    assert_eq!((items.succeeded, items.running), (0, 2));
    harness.succeed(110, "each", Some(0), 3, json!("A2"));
    harness.succeed(120, "each", Some(1), 3, json!("B2"));
    assert_eq!(harness.run.view().output, Some(json!({"each": ["A2", "B2"]})));
}

#[test]
fn a_subflow_step_redriven_from_starts_a_child_of_a_new_round() {
    let run_id = RunId(RUN.into());
    let first = ParentRef::child_run_id("transcode", &run_id, "encode", None, 0);
    let mut harness = Harness::start(PARENT, json!({}), 0);
    let ended = |child: RunId| Event::ChildEnded {
        step: "encode".to_owned(),
        item: None,
        child,
        status: RunStatus::Succeeded,
        output: Some(json!({"size": 1})),
        error: None,
        refused: false,
        keeps_round: false,
    };
    harness.apply(10, ended(first.clone()));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    redrive_from(&mut harness, 100, &["encode"]);
    let second = ParentRef::child_run_id("transcode", &run_id, "encode", None, 1);
    assert_eq!(harness.step("encode").child_run, Some(second.clone()));
    assert_eq!(harness.apply(110, ended(first)), Applied::Ignored("not the child of this step"));
    harness.apply(120, ended(second));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
}

/// A `succeed` step that ends the run as soon as `check` succeeds, and a step beside it that
/// the end cancels.
const CHECKED: &str = r##"
name: checked
steps:
  - { kind: task, id: check, pool: cpu, task: check }
  - { kind: succeed, id: done, after: [check], output: "steps.check.output" }
  - { kind: task, id: side, pool: cpu, task: side }
"##;

/// Starts [`CHECKED`] and lets `check` succeed with `"ok"`, which ends the run.
fn checked_and_done() -> Harness {
    let mut harness = Harness::start(CHECKED, json!({}), 0);
    let mut names = harness.dispatched_names();
    names.sort();
    assert_eq!(names, vec!["check", "side"]);
    harness.succeed(10, "check", None, 1, json!("ok"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step_status("side"), StepStatus::Cancelled, "the end cancels the step beside");
    harness
}

#[test]
fn a_succeeded_run_redriven_from_a_step_keeps_the_steps_its_succeed_step_cancelled() {
    let mut harness = checked_and_done();
    assert_eq!(redrive_from(&mut harness, 100, &["check"]), Applied::Accepted);
    assert_eq!(harness.dispatched_names(), vec!["check"], "a step the succeed step cancelled is not reached");
    let side = harness.step("side");
    assert_eq!((side.status, side.attempts), (StepStatus::Cancelled, 1));
    harness.succeed(110, "check", None, 2, json!("ok again"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.output(), Some(&json!("ok again")));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

/// [`CHECKED`] with a step after both `check` and `side`: the end cancels it while it waits.
const CHECKED_AND_JOINED: &str = r##"
name: checked
steps:
  - { kind: task, id: check, pool: cpu, task: check }
  - { kind: succeed, id: done, after: [check], output: "steps.check.output" }
  - { kind: task, id: side, pool: cpu, task: side }
  - { kind: task, id: report, after: [check, side], pool: cpu, task: report }
"##;

#[test]
fn a_step_the_succeed_step_cancelled_goes_again_when_a_step_started_anew_waits_for_it() {
    let mut harness = Harness::start(CHECKED_AND_JOINED, json!({}), 0);
    harness.succeed(10, "check", None, 1, json!("ok"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step_status("report"), StepStatus::Cancelled);

    // `report` waits for `side` too: left cancelled, it would hold the run going for ever.
    redrive_from(&mut harness, 100, &["report"]);
    assert_eq!(harness.dispatched_names(), vec!["side"]);
    assert_eq!(harness.step_status("report"), StepStatus::Pending);
    harness.succeed(110, "side", None, 2, json!("s"));
    assert_eq!(harness.dispatched_names(), vec!["report"]);
    harness.succeed(120, "report", None, 1, json!("r"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.output(), Some(&json!({"done": "ok", "report": "r"})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_succeed_step_keeps_its_output_for_the_run_view_and_a_later_end() {
    let mut harness = checked_and_done();
    assert_eq!(harness.step("done").output, Some(json!("ok")), "the run view shows the step's output");
    assert_eq!(harness.run.output(), Some(&json!("ok")));

    // Ended by itself this time, the run's output is its sinks' outputs: `done` among them.
    redrive_from(&mut harness, 100, &["side"]);
    assert_eq!(harness.dispatched_names(), vec!["side"]);
    harness.succeed(110, "side", None, 2, json!("s"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.output(), Some(&json!({"done": "ok", "side": "s"})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

/// [`CHECKED_AND_JOINED`] with a step after `side` that nothing started anew waits for.
const CHECKED_JOINED_AND_AUDITED: &str = r##"
name: checked
steps:
  - { kind: task, id: check, pool: cpu, task: check }
  - { kind: succeed, id: done, after: [check], output: "steps.check.output" }
  - { kind: task, id: side, pool: cpu, task: side }
  - { kind: task, id: report, after: [check, side], pool: cpu, task: report }
  - { kind: task, id: audit, after: [side], pool: cpu, task: audit }
"##;

#[test]
fn a_step_left_cancelled_stays_cancelled_when_a_step_going_again_leads_to_it() {
    let mut harness = Harness::start(CHECKED_JOINED_AND_AUDITED, json!({}), 0);
    harness.succeed(10, "check", None, 1, json!("ok"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step_status("audit"), StepStatus::Cancelled);

    // `side` goes again because `report` waits for it; `audit`, after `side` too, was not
    // reached and stays cancelled when `side` resolves.
    redrive_from(&mut harness, 100, &["report"]);
    assert_eq!(harness.dispatched_names(), vec!["side"]);
    harness.succeed(110, "side", None, 2, json!("s"));
    assert_eq!(harness.dispatched_names(), vec!["report"], "`audit` is not started");
    let audit = harness.step("audit");
    assert_eq!((audit.status, audit.attempts), (StepStatus::Cancelled, 0));
    harness.succeed(120, "report", None, 1, json!("r"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.output(), Some(&json!({"done": "ok", "report": "r"})));
    assert_eq!(harness.step_status("audit"), StepStatus::Cancelled);
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

/// A `succeed` step that ends the run as soon as `check` succeeds, and a choice after the
/// step beside it that `report` waits for.
const CHECKED_AND_ROUTED: &str = r##"
name: checked
steps:
  - { kind: task, id: check, pool: cpu, task: check }
  - { kind: succeed, id: done, after: [check], output: "steps.check.output" }
  - { kind: task, id: side, pool: cpu, task: side }
  - kind: choice
    id: route
    after: [side]
    choices:
      - when: 'steps.side.output == "big"'
        next: big
    default: small
  - { kind: task, id: big, pool: gpu, task: big }
  - { kind: task, id: small, pool: cpu, task: small }
  - { kind: task, id: report, after: [check, route], pool: cpu, task: report }
"##;

#[test]
fn the_branches_of_a_choice_going_again_stay_cancelled_when_only_a_step_after_the_choice_waits_for_it() {
    let mut harness = Harness::start(CHECKED_AND_ROUTED, json!({}), 0);
    harness.succeed(10, "check", None, 1, json!("ok"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step_status("big"), StepStatus::Cancelled);

    // `report` waits for `route`, which waits for `side`: both go again; the branches were
    // not reached and stay cancelled, whichever the choice takes.
    redrive_from(&mut harness, 100, &["report"]);
    assert_eq!(harness.dispatched_names(), vec!["side"]);
    harness.succeed(110, "side", None, 2, json!("big"));
    assert_eq!(harness.step_status("route"), StepStatus::Succeeded);
    assert_eq!(harness.dispatched_names(), vec!["report"], "the branch taken is not started");
    assert_eq!(
        (harness.step_status("big"), harness.step_status("small")),
        (StepStatus::Cancelled, StepStatus::Cancelled)
    );
    harness.succeed(120, "report", None, 1, json!("r"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.output(), Some(&json!({"done": "ok", "report": "r"})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

/// [`CHECKED_AND_JOINED`] whose `side` has a catch.
const CHECKED_AND_CAUGHT: &str = r##"
name: checked
steps:
  - { kind: task, id: check, pool: cpu, task: check }
  - { kind: succeed, id: done, after: [check], output: "steps.check.output" }
  - { kind: task, id: side, pool: cpu, task: side, catch: [{ errors: [missing], next: fallback }] }
  - { kind: task, id: fallback, pool: cpu, task: fallback }
  - { kind: task, id: report, after: [check, side], pool: cpu, task: report }
"##;

#[test]
fn the_catch_of_a_step_going_again_stays_cancelled_when_only_a_step_after_it_waits_for_it() {
    let mut harness = Harness::start(CHECKED_AND_CAUGHT, json!({}), 0);
    harness.succeed(10, "check", None, 1, json!("ok"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step_status("fallback"), StepStatus::Cancelled);

    redrive_from(&mut harness, 100, &["report"]);
    assert_eq!(harness.dispatched_names(), vec!["side"]);
    harness.succeed(110, "side", None, 2, json!("s"));
    assert_eq!(harness.dispatched_names(), vec!["report"]);
    assert_eq!(harness.step_status("fallback"), StepStatus::Cancelled, "the catch's step was not reached");
    harness.succeed(120, "report", None, 1, json!("r"));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.output(), Some(&json!({"done": "ok", "report": "r"})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

/// The same redrive, with `side` failing again with an error its catch takes: the catch's
/// step was left cancelled and does not run, so the failure fails the run rather than
/// being dropped (which would leave `report` skipped in a run that says it succeeded).
#[test]
fn a_caught_failure_of_a_step_going_again_whose_catch_was_left_cancelled_fails_the_run() {
    let mut harness = Harness::start(CHECKED_AND_CAUGHT, json!({}), 0);
    harness.succeed(10, "check", None, 1, json!("ok"));
    redrive_from(&mut harness, 100, &["report"]);
    assert_eq!(harness.dispatched_names(), vec!["side"]);
    harness.fail(110, "side", None, 2, error("missing", false));
    assert_eq!(harness.run.status(), RunStatus::Failed);
    assert_eq!(harness.run.error().map(|error| error.code.as_str()), Some("missing"));
    assert_eq!(harness.step_status("fallback"), StepStatus::Cancelled, "the catch's step was not reached");
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}
