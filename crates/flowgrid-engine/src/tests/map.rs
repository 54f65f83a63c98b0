//! Map steps: bounded fan-out, fan-in in item order, tolerated and fatal failures.

use flowgrid_model::limits::{json_bytes, msgpack_bytes};
use flowgrid_model::Limits;
use serde_json::json;

use super::support::{attempt, error, Harness};
use crate::{Applied, ItemCounts, RunStatus, StepStatus, TimerKey};

const MAP: &str = r##"
name: fan
steps:
  - kind: map
    id: each
    items: "input.list"
    pool: cpu
    task: work
    input: "#{ value: item, position: index }"
    max_concurrency: 2
    tolerated_failures: 1
    retry: { max_attempts: 1 }
  - kind: transform
    id: total
    after: [each]
    output: "steps.each.output.len()"
"##;

#[test]
fn map_keeps_two_in_flight_and_merges_in_item_order() {
    let mut harness = Harness::start(MAP, json!({"list": [10, 20, 30, 40, 50]}), 0);
    let first = harness.dispatched();
    assert_eq!(harness.dispatched_names(), vec!["each[0]", "each[1]"]);
    assert_eq!(*first[0].input, json!({"value": 10, "position": 0}));
    assert_eq!(*first[1].input, json!({"value": 20, "position": 1}));

    harness.succeed(1, "each", Some(1), 1, json!("r1"));
    assert_eq!(harness.dispatched_names(), vec!["each[2]"]);
    harness.fail(2, "each", Some(0), 1, error("broken", true));
    assert_eq!(harness.dispatched_names(), vec!["each[3]"]);
    assert_eq!(harness.step("each").items, Some(ItemCounts { total: 5, succeeded: 1, failed: 1, running: 2 }));
    harness.succeed(3, "each", Some(3), 1, json!("r3"));
    assert_eq!(harness.dispatched_names(), vec!["each[4]"]);
    assert_eq!(*harness.dispatched()[0].input, json!({"value": 50, "position": 4}));
    harness.succeed(4, "each", Some(4), 1, json!("r4"));
    assert!(harness.dispatched().is_empty());
    assert_eq!(harness.step_status("each"), StepStatus::Running);
    harness.succeed(5, "each", Some(2), 1, json!("r2"));

    let each = harness.step("each");
    assert_eq!(each.status, StepStatus::Succeeded);
    assert_eq!(each.output, Some(json!([null, "r1", "r2", "r3", "r4"])));
    assert_eq!(each.items, Some(ItemCounts { total: 5, succeeded: 4, failed: 1, running: 0 }));
    assert_eq!(each.attempts, 5);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert_eq!(view.output, Some(json!({"total": 5})));
}

#[test]
fn map_items_retry_on_their_own() {
    let yaml = r##"
name: fan
steps:
  - kind: map
    id: each
    items: "input"
    pool: cpu
    task: work
    retry: { max_attempts: 2, jitter: 0.0, initial_backoff_ms: 100 }
    output: "result.len()"
"##;
    let mut harness = Harness::start(yaml, json!(["x", "y"]), 0);
    assert_eq!(*harness.dispatched()[0].input, json!("x"));
    harness.fail(10, "each", Some(1), 1, error("busy", true));
    let retry = TimerKey::RetryDue { attempt: attempt("each", Some(1), 2) };
    assert_eq!(harness.armed(&retry), Some(110));
    assert_eq!(harness.step_status("each"), StepStatus::Running);
    harness.fire(110, retry);
    assert_eq!(harness.dispatched_names(), vec!["each[1]"]);
    assert_eq!(*harness.dispatched()[0].input, json!("y"));
    harness.succeed(111, "each", Some(0), 1, json!(0));
    harness.succeed(112, "each", Some(1), 2, json!(1));
    assert_eq!(harness.run.view().output, Some(json!({"each": 2})));
}

const STRICT: &str = r##"
name: strict
steps:
  - kind: map
    id: each
    items: "input"
    pool: cpu
    task: work
    retry: { max_attempts: 1 }
"##;

#[test]
fn too_many_failed_items_fail_the_map_and_abandon_the_rest() {
    let mut harness = Harness::start(STRICT, json!([1, 2, 3]), 0);
    assert_eq!(harness.dispatched().len(), 3);
    harness.fail(5, "each", Some(1), 1, error("broken", false));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    let run_error = view.error.expect("the run has an error");
    assert_eq!(run_error.code, "map_failed");
    assert!(run_error.message.contains("1 of 3"), "{}", run_error.message);
    assert!(run_error.message.contains("broken"), "{}", run_error.message);
    for item in [0, 2] {
        assert!(harness.cancelled(&TimerKey::AttemptTimeout { attempt: attempt("each", Some(item), 1) }));
    }
    assert_eq!(harness.finished(), vec![RunStatus::Failed]);
}

#[test]
fn an_item_input_that_fails_to_evaluate_fails_the_run_and_cancels_the_items_still_out() {
    let yaml = r##"
name: fan
steps:
  - kind: map
    id: each
    items: "input"
    pool: cpu
    task: work
    input: "#{ size: item.meta.size }"
    max_concurrency: 2
"##;
    let mut harness = Harness::start(yaml, json!([{"meta": {"size": 1}}, {"meta": {"size": 2}}, {"other": 3}]), 0);
    assert_eq!(harness.dispatched_names(), vec!["each[0]", "each[1]"]);
    // Item 0's success lets item 2 in, whose input cannot be evaluated.
    harness.succeed(1, "each", Some(0), 1, json!("r0"));
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    assert!(harness.dispatched().is_empty());
    assert!(
        harness.cancelled(&TimerKey::AttemptTimeout { attempt: attempt("each", Some(1), 1) }),
        "item 1's task is still out: its worker is told"
    );
    assert_eq!(harness.step_status("each"), StepStatus::Failed);
    assert_eq!(harness.finished(), vec![RunStatus::Failed]);
}

#[test]
fn items_left_when_the_step_s_total_timeout_is_spent_fail_unsent() {
    let yaml = r##"
name: fan
steps:
  - kind: map
    id: each
    items: "input"
    pool: cpu
    task: work
    max_concurrency: 1
    tolerated_failures: 3
    total_timeout_ms: 1000
"##;
    let mut harness = Harness::start(yaml, json!([1, 2, 3]), 0);
    assert_eq!(harness.dispatched_names(), vec!["each[0]"]);
    // Item 0's only attempt runs out with the step's budget.
    harness.fire(1000, TimerKey::AttemptTimeout { attempt: attempt("each", Some(0), 1) });
    assert!(harness.dispatched().is_empty(), "no item goes out with its budget spent");
    let each = harness.step("each");
    assert_eq!(each.items, Some(ItemCounts { total: 3, succeeded: 0, failed: 3, running: 0 }));
    assert_eq!(each.attempts, 1);
    assert_eq!(harness.run.view().status, RunStatus::Succeeded, "3 failures are tolerated");
}

#[test]
fn caught_map_failure_ignores_later_item_results() {
    let yaml = r##"
name: caught
steps:
  - kind: map
    id: each
    items: "input"
    pool: cpu
    task: work
    retry: { max_attempts: 1 }
    catch:
      - next: fallback
  - { kind: task, id: fallback, pool: cpu, task: rescue, input: "steps.each.error.code" }
"##;
    let mut harness = Harness::start(yaml, json!([1, 2]), 0);
    harness.fail(5, "each", Some(0), 1, error("broken", true));
    assert_eq!(harness.dispatched_names(), vec!["fallback"]);
    assert_eq!(*harness.dispatched()[0].input, json!("map_failed"));
    assert!(harness.cancelled(&TimerKey::AttemptTimeout { attempt: attempt("each", Some(1), 1) }));
    assert_eq!(harness.succeed(6, "each", Some(1), 1, json!(2)), Applied::Ignored("step not running"));
    let open: Vec<_> = harness.run.open_dispatches().into_iter().map(|dispatch| dispatch.attempt).collect();
    assert_eq!(open, vec![attempt("fallback", None, 1)]);
    harness.succeed(7, "fallback", None, 1, json!("saved"));
    assert_eq!(harness.run.view().output, Some(json!({"fallback": "saved"})));
}

#[test]
fn empty_map_succeeds_at_once() {
    let yaml = r##"
name: empty
steps:
  - { kind: map, id: each, items: "input", pool: cpu, task: work }
  - { kind: task, id: after_each, after: [each], pool: cpu, task: next, input: "steps.each.output" }
"##;
    let harness = Harness::start(yaml, json!([]), 0);
    assert_eq!(harness.step("each").output, Some(json!([])));
    assert_eq!(harness.dispatched_names(), vec!["after_each"]);
    assert_eq!(*harness.dispatched()[0].input, json!([]));
}

#[test]
fn map_over_a_non_array_fails_with_invalid_items() {
    let harness = Harness::start(STRICT, json!({"not": "a list"}), 0);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    assert_eq!(view.error.expect("the run has an error").code, "invalid_items");
}

#[test]
fn map_over_more_items_than_the_limit_fails_with_too_many_items() {
    let items_max = flowgrid_model::Limits::default().map_items_max;
    let list: Vec<usize> = (0..=items_max).collect();
    let harness = Harness::start(STRICT, json!(list), 0);
    let view = harness.run.view();
    assert_eq!(view.status, RunStatus::Failed);
    assert_eq!(view.error.expect("the run has an error").code, "too_many_items");
    assert!(harness.dispatched().is_empty());
}

/// Inputs an expression makes over a payload: the task step fails with
/// `payload_too_large` (a catch takes it), a map item fails like any item, and nothing is
/// dispatched for either.
#[test]
fn an_input_over_a_payload_fails_its_step_or_item_unsent() {
    let big = "x".repeat(600_000);
    let task = r##"
name: big
steps:
  - { kind: task, id: a, pool: cpu, task: t, input: "[input.s, input.s]", catch: [{ errors: [payload_too_large], next: b }] }
  - { kind: transform, id: b, output: "steps.a.error.code" }
"##;
    let harness = Harness::start(task, json!({"s": big}), 0);
    assert!(harness.run.open_dispatches().is_empty(), "nothing sent");
    let error = harness.step("a").error.expect("the step's error");
    assert_eq!(error.code, "payload_too_large");
    assert!(
        error
            .message
            .contains("the task's input is 1200011 bytes as MessagePack (as it is sent), over the limit of 1048576"),
        "{error:?}"
    );
    assert_eq!(
        (harness.run.status(), harness.run.view().output),
        (RunStatus::Succeeded, Some(json!({"b": "payload_too_large"})))
    );

    let map = r##"
name: big-items
steps:
  - { kind: map, id: each, items: "input.list", pool: cpu, task: t, input: "if item == 1 { [input.s, input.s] } else { item }", tolerated_failures: 1 }
"##;
    let mut harness = Harness::start(map, json!({"s": big, "list": [0, 1, 2]}), 0);
    assert_eq!(harness.dispatched_names(), vec!["each[0]", "each[2]"]);
    harness.succeed(1, "each", Some(0), 1, json!(0));
    harness.succeed(2, "each", Some(2), 1, json!(2));
    assert_eq!(harness.step("each").items, Some(ItemCounts { total: 3, succeeded: 2, failed: 1, running: 0 }));
    assert_eq!(harness.run.status(), RunStatus::Succeeded, "one failure tolerated");
    let harness = Harness::start(
        &map.replace("tolerated_failures: 1", "tolerated_failures: 0"),
        json!({"s": big, "list": [1, 0]}),
        0,
    );
    assert!(harness.dispatched_names().is_empty(), "{:?}", harness.dispatched_names());
    let error = harness.step("each").error.expect("the map's error");
    assert!(error.message.contains("item 0 failed with `payload_too_large`"), "{error:?}");
    assert_eq!(harness.run.status(), RunStatus::Failed);
}

/// An input is measured as it is sent, in MessagePack: a string of control characters
/// (6 bytes each as JSON, 1 as MessagePack) fits though its JSON is over a payload, and a
/// list of floats (4 bytes each as JSON with its comma, 9 as MessagePack) does not though
/// its JSON is under.
#[test]
fn an_input_is_measured_in_the_encoding_it_is_sent_in() {
    let payload_bytes_max = Limits::default().payload_bytes_max;
    let controls = json!("\u{1}".repeat(300_000));
    assert!(json_bytes(&controls) > payload_bytes_max && msgpack_bytes(&controls) < payload_bytes_max);
    let task = r##"
name: sized
steps:
  - { kind: task, id: a, pool: cpu, task: t, input: "input.s" }
  - { kind: map, id: each, items: "[input.s]", pool: cpu, task: t }
"##;
    let harness = Harness::start(task, json!({"s": controls}), 0);
    assert_eq!(harness.dispatched_names(), vec!["a", "each[0]"], "{:?}", harness.run.view().error);
    assert!(harness.dispatched().iter().all(|dispatch| *dispatch.input == controls));

    // Fewer floats than an expression may make into one value, and text to pass the limit.
    let (floats, text) = (json!(vec![0.5; 90_000]), json!("x".repeat(250_000)));
    let both = json!([floats, text]);
    assert!(json_bytes(&both) < payload_bytes_max && msgpack_bytes(&both) > payload_bytes_max);
    let task = task.replace("input.s", "[input.f, input.t]");
    let harness = Harness::start(&task, json!({"f": floats, "t": text}), 0);
    assert!(harness.dispatched().is_empty(), "{:?}", harness.dispatched_names());
    let error = harness.step("a").error.expect("the step's error");
    assert_eq!(error.code, "payload_too_large", "{error:?}");
    assert!(error.message.contains(&format!("is {} bytes as MessagePack", msgpack_bytes(&both))), "{error:?}");
}

#[test]
fn item_inputs_read_the_run_input_and_earlier_steps_item_after_item() {
    // The scope of the items' `input` is converted once for the step, and read by each
    // item as it starts, one result after another.
    let flow = r##"
name: fan-scope
steps:
  - { kind: task, id: probe, pool: cpu, task: probe }
  - kind: map
    id: each
    after: [probe]
    items: "input.list"
    pool: cpu
    task: work
    input: "#{ value: item * input.factor, position: index, kind: steps.probe.output.kind, n: input.list.len() }"
    max_concurrency: 1
"##;
    let mut harness = Harness::start(flow, json!({"list": [1, 2, 3], "factor": 10}), 0);
    harness.succeed(1, "probe", None, 1, json!({"kind": "video"}));
    for (position, seq) in [(0, 2), (1, 3), (2, 4)] {
        let dispatched = harness.dispatched();
        assert_eq!(dispatched.len(), 1);
        let value = (position + 1) * 10;
        assert_eq!(*dispatched[0].input, json!({"value": value, "position": position, "kind": "video", "n": 3}));
        // Held while items wait to start, dropped once the last has started.
        assert_eq!(harness.run.map_scope_prepared("each"), position < 2);
        harness.succeed(seq, "each", Some(position as u32), 1, json!(value));
    }
    assert_eq!(harness.step("each").output, Some(json!([10, 20, 30])));
    assert_eq!(harness.run.view().status, RunStatus::Succeeded);

    // A map that fails with items still to start drops it too.
    let mut harness = Harness::start(flow, json!({"list": [1, 2, 3], "factor": 10}), 0);
    harness.succeed(1, "probe", None, 1, json!({"kind": "video"}));
    assert!(harness.run.map_scope_prepared("each"));
    harness.fail(2, "each", Some(0), 1, error("broken", false));
    assert_eq!(harness.step_status("each"), StepStatus::Failed);
    assert!(!harness.run.map_scope_prepared("each"));
}

/// An item's retry due before the map's budget ran out but fired after it is not sent: the
/// item fails with `timeout`.
#[test]
fn an_item_retry_fired_after_the_total_timeout_fails_the_item_unsent() {
    let yaml = r##"
name: fan
steps:
  - kind: map
    id: each
    items: "input"
    pool: cpu
    task: work
    timeout_ms: 60000
    total_timeout_ms: 60000
    retry: { max_attempts: 3, initial_backoff_ms: 1000, backoff_multiplier: 1.0, max_backoff_ms: 1000, jitter: 0 }
"##;
    let mut harness = Harness::start(yaml, json!(["x"]), 0);
    assert_eq!(harness.fail(49_000, "each", Some(0), 1, error("busy", true)), Applied::Accepted);
    let retry = TimerKey::RetryDue { attempt: attempt("each", Some(0), 2) };
    assert_eq!(harness.armed(&retry), Some(50_000), "due before the budget runs out");
    assert_eq!(harness.fire(65_000, retry), Applied::Accepted);
    assert!(harness.dispatched().is_empty(), "no item goes out with its budget spent");
    let each = harness.step("each");
    assert_eq!(each.items, Some(ItemCounts { total: 1, succeeded: 0, failed: 1, running: 0 }));
    assert_eq!((each.status, each.attempts), (StepStatus::Failed, 1));
    let error = each.error.expect("the step's error");
    assert_eq!(error.code, "map_failed");
    assert!(error.message.contains("item 0 failed with `timeout`"), "{error:?}");
    assert!(error.message.contains("total_timeout_ms of 60000 ms (1 attempt; the retry"), "{error:?}");
}
