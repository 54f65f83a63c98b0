//! `when`: a step whose condition is false is skipped, as a step no edge activated.

use serde_json::json;

use super::support::Harness;
use crate::{RunStatus, StepStatus};

const FLOW: &str = r##"
name: conditions
steps:
  - { kind: task, id: fetch, pool: cpu, task: fetch, when: 'input.fetch' }
  - { kind: task, id: notify, after: [fetch], pool: cpu, task: notify, when: 'steps.fetch.output.size > 10' }
  - { kind: transform, id: after_notify, after: [notify], output: '1' }
  - { kind: transform, id: join, after: [fetch, notify], output: 'steps.notify.status' }
"##;

#[test]
fn a_false_condition_skips_the_step_and_what_only_it_leads_to() {
    let mut harness = Harness::start(FLOW, json!({"fetch": true}), 0);
    assert_eq!(harness.dispatched_names(), ["fetch"]);
    harness.succeed(10, "fetch", None, 1, json!({"size": 3}));
    assert!(harness.dispatched().is_empty(), "notify's condition is false");
    let statuses: Vec<_> = ["notify", "after_notify", "join"].iter().map(|id| harness.step_status(id)).collect();
    assert_eq!(statuses, [StepStatus::Skipped, StepStatus::Skipped, StepStatus::Succeeded]);
    assert_eq!(harness.step("notify").started_ms, None, "a skipped step never started");
    assert_eq!(harness.run.view().output, Some(json!({"join": "skipped"})));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
}

#[test]
fn a_true_condition_runs_the_step_and_a_root_reads_the_input() {
    let mut harness = Harness::start(FLOW, json!({"fetch": true}), 0);
    harness.succeed(10, "fetch", None, 1, json!({"size": 30}));
    assert_eq!(harness.dispatched_names(), ["notify"]);

    let harness = Harness::start(FLOW, json!({"fetch": false}), 0);
    assert!(harness.dispatched().is_empty(), "the root's condition is false");
    assert_eq!(harness.run.status(), RunStatus::Succeeded, "everything after it is skipped");
}

#[test]
fn a_condition_that_fails_or_is_no_boolean_fails_the_run() {
    let harness = Harness::start(FLOW, json!({"fetch": "yes"}), 0);
    assert_eq!(harness.run.status(), RunStatus::Failed);
    let error = harness.run.error().expect("the run's error").clone();
    assert_eq!(error.code, "expression_error");
    assert!(error.message.contains("step `fetch`, field `when`") && error.message.contains("a boolean"), "{error:?}");
}
