//! Flow shapes: chains, joins, choices, catches, succeed/fail steps, cancel, run timeout.

use serde_json::json;

use super::support::{attempt, error, Harness};
use crate::{Applied, Event, RunStatus, StepStatus, TimerKey};

const CHAIN: &str = r##"
name: chain
steps:
  - kind: task
    id: a
    pool: cpu
    task: first
  - kind: task
    id: b
    after: [a]
    pool: cpu
    task: second
    input: "steps.a.output.n + 1"
"##;

#[test]
fn linear_chain_runs_step_after_step() {
    let mut harness = Harness::start(CHAIN, json!({"n": 0}), 100);
    let first = harness.dispatched();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, attempt("a", None, 1));
    assert_eq!(*first[0].input, json!({"n": 0}));
    assert_eq!(&*first[0].pool, "cpu");
    assert_eq!(first[0].deadline_ms, 100 + flowgrid_model::plan::TASK_TIMEOUT_MS_DEFAULT);
    assert_eq!(harness.armed(&TimerKey::AttemptTimeout { attempt: attempt("a", None, 1) }), Some(first[0].deadline_ms));
    assert_eq!(harness.step_status("b"), StepStatus::Pending);

    assert_eq!(harness.succeed(200, "a", None, 1, json!({"n": 1})), Applied::Accepted);
    assert!(harness.cancelled(&TimerKey::AttemptTimeout { attempt: attempt("a", None, 1) }));
    let second = harness.dispatched();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempt, attempt("b", None, 1));
    assert_eq!(*second[0].input, json!(2));

    assert_eq!(harness.succeed(300, "b", None, 1, json!("done")), Applied::Accepted);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert_eq!(view.output, Some(json!({"b": "done"})));
    assert_eq!(view.ended_ms, Some(300));
    assert_eq!(harness.finished(), vec![RunStatus::Succeeded]);
    assert!(harness.run.armed_timers().is_empty());
    assert!(harness.run.open_dispatches().is_empty());
    let a = harness.step("a");
    assert_eq!((a.started_ms, a.ended_ms, a.attempts), (Some(100), Some(200), 1));
}

#[test]
fn parallel_branches_join() {
    let yaml = r##"
name: diamond
steps:
  - { kind: task, id: a, pool: cpu, task: t }
  - { kind: task, id: b, after: [a], pool: cpu, task: t }
  - { kind: task, id: c, after: [a], pool: cpu, task: t }
  - kind: task
    id: d
    after: [b, c]
    pool: cpu
    task: t
    input: "[steps.b.output, steps.c.output]"
"##;
    let mut harness = Harness::start(yaml, json!(null), 0);
    harness.succeed(1, "a", None, 1, json!("a"));
    assert_eq!(harness.dispatched_names(), vec!["b", "c"]);
    harness.succeed(2, "c", None, 1, json!("c"));
    assert!(harness.dispatched().is_empty());
    assert_eq!(harness.step_status("d"), StepStatus::Pending);
    harness.succeed(3, "b", None, 1, json!("b"));
    let joined = harness.dispatched();
    assert_eq!(joined.len(), 1);
    assert_eq!(*joined[0].input, json!(["b", "c"]));
    harness.succeed(4, "d", None, 1, json!("d"));
    assert_eq!(harness.run.view().output, Some(json!({"d": "d"})));
}

const ROUTE: &str = r##"
name: route
steps:
  - kind: choice
    id: route
    choices:
      - when: "input.size > 10"
        next: big
    default: small
  - { kind: task, id: big, pool: cpu, task: big }
  - { kind: task, id: small, pool: cpu, task: small }
  - { kind: task, id: big_post, after: [big], pool: cpu, task: post }
  - kind: transform
    id: join
    after: [big_post, small]
    output: "#{ big: steps.big_post.status, small: steps.small.output }"
"##;

#[test]
fn choice_skips_the_untaken_branch_into_the_join() {
    let mut harness = Harness::start(ROUTE, json!({"size": 3}), 0);
    assert_eq!(harness.dispatched_names(), vec!["small"]);
    assert_eq!(harness.step_status("route"), StepStatus::Succeeded);
    assert_eq!(harness.step_status("big"), StepStatus::Skipped);
    assert_eq!(harness.step_status("big_post"), StepStatus::Skipped);
    assert_eq!(harness.step_status("join"), StepStatus::Pending);
    harness.succeed(5, "small", None, 1, json!("s"));
    assert_eq!(harness.step_status("join"), StepStatus::Succeeded);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert_eq!(view.output, Some(json!({"join": {"big": "skipped", "small": "s"}})));
}

#[test]
fn choice_takes_the_first_matching_rule() {
    let mut harness = Harness::start(ROUTE, json!({"size": 30}), 0);
    assert_eq!(harness.dispatched_names(), vec!["big"]);
    assert_eq!(harness.step_status("small"), StepStatus::Skipped);
    harness.succeed(1, "big", None, 1, json!(1));
    assert_eq!(harness.dispatched_names(), vec!["big_post"]);
    harness.succeed(2, "big_post", None, 1, json!(2));
    assert_eq!(harness.run.view().output, Some(json!({"join": {"big": "succeeded", "small": null}})));
}

#[test]
fn choice_without_match_or_default_fails_the_run() {
    let yaml = r##"
name: strict
steps:
  - kind: choice
    id: route
    choices:
      - when: "input.size > 10"
        next: big
  - { kind: task, id: big, pool: cpu, task: big }
"##;
    let harness = Harness::start(yaml, json!({"size": 3}), 0);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    assert_eq!(view.error.expect("the run has an error").code, "no_choice_matched");
    assert_eq!(harness.finished(), vec![RunStatus::Failed]);
    assert_eq!(harness.step_status("big"), StepStatus::Cancelled);
}

#[test]
fn expression_error_fails_the_run_naming_step_and_field() {
    let harness = Harness::start(CHAIN, json!({"n": 0}), 0);
    let mut harness = harness;
    harness.succeed(1, "a", None, 1, json!({"other": true}));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    let run_error = view.error.expect("the run has an error");
    assert_eq!(run_error.code, "expression_error");
    assert!(run_error.message.contains("`b`"), "{}", run_error.message);
    assert!(run_error.message.contains("`input`"), "{}", run_error.message);
    assert_eq!(harness.finished(), vec![RunStatus::Failed]);
}

const CATCH: &str = r##"
name: catch
steps:
  - kind: task
    id: fetch
    pool: net
    task: fetch
    retry: { max_attempts: 1 }
    catch:
      - errors: [not_found]
        next: fallback
  - kind: transform
    id: fallback
    output: '"code=" + steps.fetch.error.code'
  - { kind: task, id: use, after: [fetch], pool: cpu, task: use }
"##;

#[test]
fn catch_routes_the_failure_to_the_fallback() {
    let mut harness = Harness::start(CATCH, json!(null), 0);
    harness.fail(10, "fetch", None, 1, error("not_found", true));
    let fetch = harness.step("fetch");
    assert_eq!(fetch.status, StepStatus::Failed);
    assert!(fetch.caught);
    assert_eq!(fetch.error.expect("the step has an error").code, "not_found");
    assert_eq!(harness.step_status("use"), StepStatus::Skipped);
    assert_eq!(harness.step("fallback").output, Some(json!("code=not_found")));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert_eq!(view.output, Some(json!({"fallback": "code=not_found"})));
}

#[test]
fn uncaught_failure_fails_the_run_with_the_task_error() {
    let mut harness = Harness::start(CATCH, json!(null), 0);
    harness.fail(10, "fetch", None, 1, error("forbidden", true));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    assert_eq!(view.error, Some(error("forbidden", true)));
    assert_eq!(harness.step_status("fallback"), StepStatus::Cancelled);
    assert_eq!(harness.finished(), vec![RunStatus::Failed]);
}

const DECIDE: &str = r##"
name: decide
steps:
  - { kind: task, id: check, pool: cpu, task: check }
  - { kind: task, id: side, pool: cpu, task: side }
  - kind: choice
    id: decide
    after: [check]
    choices:
      - when: "steps.check.output.ok"
        next: done
    default: bad
  - kind: succeed
    id: done
    output: "#{ value: steps.check.output.value }"
  - kind: fail
    id: bad
    error: check_failed
    message: '"check said " + steps.check.output.reason'
"##;

/// A step whose only follower is its catch's target is a sink: its output is in the default
/// run output when it succeeds (the catch leads on only from a failure).
#[test]
fn a_step_with_a_catch_that_succeeds_is_in_the_default_output() {
    let yaml = r##"
name: pay
steps:
  - { kind: task, id: charge, pool: http, task: request, catch: [{ errors: ["*"], next: declined }] }
  - { kind: transform, id: declined, output: '"declined"' }
"##;
    let mut harness = Harness::start(yaml, json!({}), 0);
    harness.succeed(10, "charge", None, 1, json!({"id": "ch_1"}));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert_eq!(view.output, Some(json!({"charge": {"id": "ch_1"}})));
    let mut caught = Harness::start(yaml, json!({}), 0);
    caught.fail(10, "charge", None, 1, error("card_declined", false));
    assert_eq!(caught.run.view().output, Some(json!({"declined": "declined"})), "the catch's target, once it ran");
}

/// A `succeed` step without `output` (nor a flow `output`) ends the run with the outputs of
/// the steps it follows and of the sinks that succeeded (it is a sink without an output).
#[test]
fn a_succeed_step_without_output_gives_the_outputs_of_the_steps_it_follows() {
    let yaml = r##"
name: done
steps:
  - { kind: task, id: merge, pool: p, task: t }
  - { kind: succeed, id: done, after: [merge] }
  - { kind: transform, id: side, output: '1' }
"##;
    let mut harness = Harness::start(yaml, json!({}), 0);
    harness.succeed(10, "merge", None, 1, json!({"url": "s3://x"}));
    let view = harness.run.view();
    let output = json!({"merge": {"url": "s3://x"}, "side": 1});
    assert_eq!((view.status, view.output), (RunStatus::Succeeded, Some(output)), "and the sinks that succeeded");
}

#[test]
fn succeed_step_ends_the_run_and_cancels_the_rest() {
    let mut harness = Harness::start(DECIDE, json!(null), 0);
    assert_eq!(harness.dispatched_names(), vec!["check", "side"]);
    harness.succeed(5, "check", None, 1, json!({"ok": true, "value": 7}));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert_eq!(view.output, Some(json!({"value": 7})));
    assert_eq!(harness.step_status("done"), StepStatus::Succeeded);
    assert_eq!(harness.step_status("side"), StepStatus::Cancelled);
    assert_eq!(harness.step_status("bad"), StepStatus::Skipped);
    assert!(harness.cancelled(&TimerKey::AttemptTimeout { attempt: attempt("side", None, 1) }));
    assert_eq!(harness.finished(), vec![RunStatus::Succeeded]);
    assert_eq!(harness.succeed(6, "side", None, 1, json!(1)), Applied::Ignored("run already ended"));
}

#[test]
fn fail_step_ends_the_run_with_its_error() {
    let mut harness = Harness::start(DECIDE, json!(null), 0);
    harness.succeed(5, "check", None, 1, json!({"ok": false, "reason": "nope"}));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    let run_error = view.error.expect("the run has an error");
    assert_eq!(run_error.code, "check_failed");
    assert_eq!(run_error.message, "check said nope");
    assert_eq!(harness.finished(), vec![RunStatus::Failed]);
}

#[test]
fn cancel_ends_the_run_once() {
    let mut harness = Harness::start(CHAIN, json!({"n": 0}), 0);
    let cancel = Event::CancelRequested { reason: "operator".to_owned() };
    assert_eq!(harness.apply(7, cancel.clone()), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Cancelled);
    assert_eq!(harness.step_status("a"), StepStatus::Cancelled);
    assert_eq!(harness.step_status("b"), StepStatus::Cancelled);
    assert!(harness.run.armed_timers().is_empty());
    assert!(harness.run.open_dispatches().is_empty());
    assert_eq!(harness.apply(8, cancel), Applied::Ignored("run already ended"));
    assert_eq!(harness.succeed(9, "a", None, 1, json!({"n": 1})), Applied::Ignored("run already ended"));
    assert_eq!(harness.finished(), vec![RunStatus::Cancelled]);
}

#[test]
fn run_timeout_ends_the_run() {
    let yaml = r##"
name: slow
timeout_ms: 1000
steps:
  - { kind: task, id: a, pool: cpu, task: t }
"##;
    let mut harness = Harness::start(yaml, json!(null), 500);
    assert_eq!(harness.armed(&TimerKey::RunTimeout), Some(1500));
    // The worker is told the run's end: its work is wasted past it, though the attempt's own
    // timeout (5 min by default) comes later.
    assert_eq!(harness.dispatched()[0].deadline_ms, 1500);
    assert_eq!(harness.run.open_dispatches()[0].deadline_ms, 1500);
    assert_eq!(
        harness.armed(&TimerKey::AttemptTimeout { attempt: attempt("a", None, 1) }),
        Some(500 + flowgrid_model::plan::TASK_TIMEOUT_MS_DEFAULT)
    );
    assert_eq!(harness.fire(1500, TimerKey::RunTimeout), Applied::Accepted);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::TimedOut);
    assert_eq!(view.error.expect("the run has an error").code, "run_timeout");
    assert_eq!(harness.step_status("a"), StepStatus::Cancelled);
    assert!(harness.cancelled(&TimerKey::AttemptTimeout { attempt: attempt("a", None, 1) }));
    assert_eq!(harness.finished(), vec![RunStatus::TimedOut]);
}

#[test]
fn engine_only_flow_ends_within_start() {
    let yaml = r##"
name: compute
output: "steps.double.output + 1"
steps:
  - { kind: transform, id: double, output: "input * 2" }
"##;
    let harness = Harness::start(yaml, json!(20), 0);
    assert_eq!(harness.finished(), vec![RunStatus::Succeeded]);
    assert_eq!(harness.run.view().output, Some(json!(41)));
}

/// The borrowed view must serialize exactly as the owned one: final snapshots are encoded
/// from it and read back as `RunView`.
#[test]
fn borrowed_view_serializes_as_the_owned_view() {
    let same = |harness: &Harness, what: &str| {
        let borrowed = serde_json::to_string(&harness.run.view_ref()).expect("encodes");
        let owned = serde_json::to_string(&harness.run.view()).expect("encodes");
        assert_eq!(borrowed, owned, "{what}");
    };
    // Running: no output and no end yet.
    let mut harness = Harness::start(CATCH, json!({"given": [1, "two"]}), 0);
    same(&harness, "a running run");
    // Failed: a run error, a step error, a cancelled step.
    harness.fail(10, "fetch", None, 1, error("forbidden", true));
    same(&harness, "a failed run");
    // Succeeded after a caught failure of a map: item counts, `caught`, outputs.
    let caught_map = r##"
name: caught
steps:
  - { kind: map, id: each, items: "input", pool: cpu, task: work, retry: { max_attempts: 1 }, catch: [ { next: fallback } ] }
  - { kind: task, id: fallback, pool: cpu, task: rescue, input: "steps.each.error.code" }
"##;
    let mut harness = Harness::start(caught_map, json!([1, 2]), 0);
    harness.fail(5, "each", Some(0), 1, error("broken", true));
    harness.succeed(7, "fallback", None, 1, json!({"saved": true}));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert!(view.steps[0].caught && view.steps[0].items.is_some() && view.steps[0].error.is_some());
    same(&harness, "a run that succeeded after a caught map failure");
}
