//! Subflow steps: a run starts a child run and takes its end, exactly once.

use serde_json::json;

use super::replay::replay;
use super::support::{Harness, RUN};
use crate::{Applied, ChildStart, Effect, Event, RunStatus, StepStatus, TaskError, TimerKey};
use flowgrid_model::{ParentRef, RunId};

const PARENT: &str = r##"
name: parent
steps:
  - kind: subflow
    id: encode
    flow: transcode
    input: '#{ url: input.video }'
    catch: [{ errors: [bad_codec], next: fallback }]
  - { kind: transform, id: done, after: [encode], output: "steps.encode.output.size" }
  - { kind: transform, id: fallback, output: '"kept the original"' }
"##;

fn child_id() -> RunId {
    ParentRef::child_run_id("transcode", &RunId(RUN.into()), "encode", None, 0)
}

fn starts(effects: &[Effect]) -> Vec<ChildStart> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::StartChild(start) => Some(start.clone()),
            _ => None,
        })
        .collect()
}

fn ended(child: RunId, status: RunStatus, output: Option<serde_json::Value>, error: Option<TaskError>) -> Event {
    Event::ChildEnded {
        step: "encode".to_owned(),
        item: None,
        child,
        status,
        output,
        error,
        refused: false,
        keeps_round: false,
    }
}

#[test]
fn a_subflow_step_starts_its_child_and_takes_its_output() {
    let mut harness = Harness::start(PARENT, json!({"video": "v.mp4"}), 1_000);
    let asked = starts(&harness.effects);
    assert_eq!(asked.len(), 1, "{:?}", harness.effects);
    let start = &asked[0];
    assert_eq!((start.child.clone(), start.flow.as_str(), start.step.as_str()), (child_id(), "transcode", "encode"));
    assert_eq!((start.parent.as_str(), start.version), (RUN, None));
    assert_eq!(*start.input, json!({"url": "v.mp4"}));
    assert_eq!(harness.run.open_child_starts(), asked, "a reload starts the same child again");
    assert_eq!(harness.step("encode").child_run, Some(child_id()));
    assert_eq!(harness.step_status("encode"), StepStatus::Running);

    let stranger = RunId("someone-else".into());
    let applied = harness.apply(1_500, ended(stranger, RunStatus::Succeeded, Some(json!({"size": 1})), None));
    assert_eq!(applied, Applied::Ignored("not the child of this step"));

    let applied = harness.apply(2_000, ended(child_id(), RunStatus::Succeeded, Some(json!({"size": 42})), None));
    assert_eq!(applied, Applied::Accepted);
    assert_eq!(harness.step("encode").output, Some(json!({"size": 42})));
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.view().output, Some(json!({"done": 42})));
    assert!(harness.run.open_child_starts().is_empty());

    let (replayed, effects) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history rebuilds the child's end");
    assert_eq!(starts(&effects).len(), 1, "replaying asks for the same child");
}

#[test]
fn a_failed_child_fails_the_step_with_its_error_and_a_catch_takes_it() {
    let mut harness = Harness::start(PARENT, json!({"video": "v.mp4"}), 0);
    let error = TaskError { code: "bad_codec".into(), message: "no decoder for vp9".into(), retryable: false };
    assert_eq!(harness.apply(10, ended(child_id(), RunStatus::Failed, None, Some(error))), Applied::Accepted);
    let encode = harness.step("encode");
    assert_eq!((encode.status, encode.caught), (StepStatus::Failed, true));
    let error = encode.error.expect("the child's error");
    assert_eq!(error.code, "bad_codec");
    assert!(error.message.contains(child_id().as_str()) && error.message.contains("no decoder"), "{error:?}");
    assert_eq!(harness.run.view().output, Some(json!({"fallback": "kept the original"})));
    let again = harness.apply(20, ended(child_id(), RunStatus::Failed, None, None));
    assert_eq!(again, Applied::Ignored("run already ended"));
}

#[test]
fn a_child_the_grid_refused_to_start_fails_the_step_and_is_not_named() {
    let mut harness = Harness::start(PARENT, json!({"video": "v.mp4"}), 0);
    let refused = TaskError { code: "not_found".into(), message: "no flow named transcode".into(), retryable: false };
    let event = Event::ChildEnded {
        step: "encode".to_owned(),
        item: None,
        child: child_id(),
        status: RunStatus::Failed,
        output: None,
        error: Some(refused),
        refused: true,
        keeps_round: true,
    };
    assert_eq!(harness.apply(10, event), Applied::Accepted);
    let encode = harness.step("encode");
    assert_eq!((encode.status, encode.child_run.as_ref()), (StepStatus::Failed, None), "{encode:?}");
    assert_eq!(harness.run.status(), RunStatus::Failed, "no catch for not_found");
    let message = &encode.error.as_ref().expect("the step's error").message;
    assert!(message.starts_with("a child run of flow `transcode` was refused: "), "{message}");
    assert!(!message.contains(child_id().as_str()), "the refused child never existed: {message}");
}

#[test]
fn an_uncaught_child_failure_fails_the_run_and_a_cancelled_child_says_so() {
    let mut harness = Harness::start(PARENT, json!({"video": "v.mp4"}), 0);
    assert_eq!(harness.apply(10, ended(child_id(), RunStatus::Cancelled, None, None)), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Failed);
    let error = harness.run.error().expect("the run's error").clone();
    assert_eq!(error.code, "cancelled", "{error:?}");
}

#[test]
fn a_parent_that_ends_cancels_its_child_still_going() {
    let mut harness = Harness::start(PARENT, json!({"video": "v.mp4"}), 0);
    assert_eq!(harness.apply(5, Event::CancelRequested { reason: "stop".into() }), Applied::Accepted);
    let cancels: Vec<&Effect> =
        harness.effects.iter().filter(|effect| matches!(effect, Effect::CancelChild { .. })).collect();
    assert_eq!(cancels.len(), 1, "{:?}", harness.effects);
    let Effect::CancelChild { child, reason } = cancels[0] else { unreachable!() };
    assert_eq!(*child, child_id());
    assert!(reason.contains("cancelled"), "{reason}");
    let finished = harness.effects.iter().position(|effect| matches!(effect, Effect::RunFinished { .. }));
    let cancel = harness.effects.iter().position(|effect| matches!(effect, Effect::CancelChild { .. }));
    assert!(cancel < finished, "the cancel comes before the end");
    assert_eq!(harness.step_status("encode"), StepStatus::Cancelled);
    assert!(harness.run.open_child_starts().is_empty());
}

#[test]
fn a_broken_input_fails_the_run_without_asking_for_a_child() {
    let yaml = r##"
name: broken
steps:
  - { kind: subflow, id: invoke, flow: other, input: "input.a.b" }
"##;
    let harness = Harness::start(yaml, json!({}), 0);
    assert!(starts(&harness.effects).is_empty(), "{:?}", harness.effects);
    assert_eq!(harness.run.status(), RunStatus::Failed);
    assert_eq!(harness.step("invoke").child_run, None, "no child was asked for");
}

const FAN: &str = r##"
name: fan
steps:
  - kind: subflow
    id: each
    flow: transcode
    items: 'input.videos'
    input: '#{ url: item, n: index }'
    max_concurrency: 2
    tolerated_failures: TOLERATED
"##;

fn item_id(item: u32) -> RunId {
    ParentRef::child_run_id("transcode", &RunId(RUN.into()), "each", Some(item), 0)
}

fn item_ended(item: u32, status: RunStatus, output: Option<serde_json::Value>) -> Event {
    let error = (status != RunStatus::Succeeded).then(|| TaskError {
        code: "bad_codec".into(),
        message: format!("item {item}"),
        retryable: false,
    });
    Event::ChildEnded {
        step: "each".to_owned(),
        item: Some(item),
        child: item_id(item),
        status,
        output,
        error,
        refused: false,
        keeps_round: false,
    }
}

#[test]
fn a_subflow_step_with_items_runs_a_child_per_item_within_its_concurrency() {
    let yaml = FAN.replace("TOLERATED", "1");
    let mut harness = Harness::start(&yaml, json!({"videos": ["a", "b", "c"]}), 0);
    let asked = starts(&harness.effects);
    let children: Vec<(RunId, Option<u32>)> = asked.iter().map(|start| (start.child.clone(), start.item)).collect();
    assert_eq!(children, [(item_id(0), Some(0)), (item_id(1), Some(1))], "two at once");
    assert_eq!(*asked[1].input, json!({"url": "b", "n": 1}));
    assert_ne!(item_id(0), child_id(), "each item has a child of its own");
    assert_eq!(harness.run.open_child_starts(), asked);
    assert_eq!(harness.step("each").child_run, None, "the items' children are not one step's child");

    let wrong = Event::ChildEnded {
        step: "each".to_owned(),
        item: Some(0),
        child: item_id(1),
        status: RunStatus::Succeeded,
        output: None,
        error: None,
        refused: false,
        keeps_round: false,
    };
    assert_eq!(harness.apply(5, wrong), Applied::Ignored("not the child of this step"));
    assert_eq!(harness.apply(10, item_ended(1, RunStatus::Succeeded, Some(json!("B")))), Applied::Accepted);
    let next = starts(&harness.effects);
    assert_eq!((next.len(), next[0].item), (1, Some(2)), "a finished child makes room for the next item");
    assert_eq!(
        harness.apply(11, item_ended(1, RunStatus::Succeeded, Some(json!("B")))),
        Applied::Ignored("the subflow step does not wait for that child")
    );
    assert_eq!(harness.apply(20, item_ended(0, RunStatus::Failed, None)), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Running, "one failure is tolerated");
    assert_eq!(harness.apply(30, item_ended(2, RunStatus::Succeeded, Some(json!("C")))), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.step("each").output, Some(json!([null, "B", "C"])), "outputs in item order");
    let counts = harness.step("each").items.expect("item counts");
    assert_eq!((counts.total, counts.succeeded, counts.failed), (3, 2, 1));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn too_many_failed_children_fail_the_step_and_cancel_the_children_still_going() {
    let yaml = FAN.replace("TOLERATED", "0");
    let mut harness = Harness::start(&yaml, json!({"videos": ["a", "b", "c"]}), 0);
    assert_eq!(harness.apply(10, item_ended(0, RunStatus::TimedOut, None)), Applied::Accepted);
    let cancelled: Vec<RunId> = harness
        .effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::CancelChild { child, .. } => Some(child.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, [item_id(1)], "the child still going is cancelled, no later item starts");
    assert!(starts(&harness.effects).is_empty());
    assert_eq!(harness.run.status(), RunStatus::Failed);
    let error = harness.run.error().expect("an error").clone();
    assert_eq!(error.code, "map_failed", "{error:?}");
    assert!(error.message.contains("bad_codec"), "{error:?}");
}

#[test]
fn a_subflow_step_timeout_cancels_its_child_and_fails_the_step_with_timeout() {
    let yaml = PARENT
        .replace("    flow: transcode\n", "    flow: transcode\n    timeout_ms: 1000\n")
        .replace("[bad_codec]", "[timeout]");
    let mut harness = Harness::start(&yaml, json!({"video": "v.mp4"}), 100);
    let timer = TimerKey::SubflowTimeout { step: "encode".to_owned() };
    assert_eq!(harness.armed(&timer), Some(1_100));
    assert!(harness.run.armed_timers().contains(&(timer.clone(), 1_100)), "the timer follows from the state");
    assert_eq!(harness.fire(1_100, timer.clone()), Applied::Accepted);
    assert!(
        harness
            .effects
            .iter()
            .any(|effect| matches!(effect, Effect::CancelChild { child, .. } if *child == child_id())),
        "{:?}",
        harness.effects
    );
    let encode = harness.step("encode");
    assert_eq!((encode.status, encode.caught), (StepStatus::Failed, true));
    assert_eq!(encode.error.expect("an error").code, "timeout");
    assert_eq!(harness.run.view().output, Some(json!({"fallback": "kept the original"})));
    let late = ended(child_id(), RunStatus::Cancelled, None, None);
    assert_eq!(harness.apply(1_200, late), Applied::Ignored("run already ended"));

    // A child that ends in time drops the timer, before the run's end.
    let mut harness = Harness::start(&yaml, json!({"video": "v.mp4"}), 100);
    assert_eq!(
        harness.apply(500, ended(child_id(), RunStatus::Succeeded, Some(json!({"size": 1})), None)),
        Applied::Accepted
    );
    assert!(harness.cancelled(&timer), "{:?}", harness.effects);
    let cancel = harness.effects.iter().position(|effect| matches!(effect, Effect::CancelTimer { .. }));
    let finished = harness.effects.iter().position(|effect| matches!(effect, Effect::RunFinished { .. }));
    assert!(cancel < finished, "{:?}", harness.effects);
    assert_eq!(harness.fire(1_100, timer), Applied::Ignored("run already ended"));
}

#[test]
fn a_child_run_carries_its_parents_labels() {
    let plan = super::support::plan("name: parent\nsteps:\n  - { kind: subflow, id: encode, flow: transcode }\n");
    let labels: flowgrid_model::Labels = [("customer".to_owned(), "acme".to_owned())].into();
    let mut effects = Vec::new();
    let start = crate::RunStart {
        run_id: RunId(RUN.into()),
        input: json!({}),
        labels: labels.clone(),
        now: 0,
        queued: false,
        start_at: None,
    };
    let run = crate::Run::start(plan, super::support::evaluator(), start, &mut effects);
    let start = effects
        .iter()
        .find_map(|effect| match effect {
            Effect::StartChild(start) => Some(start.clone()),
            _ => None,
        })
        .expect("the subflow step asks for its child at once");
    assert_eq!(start.labels, labels, "the child start, as the run starts");
    assert_eq!(run.open_child_starts()[0].labels, labels, "and as a reload asks for it again");
    assert_eq!(run.labels(), Some(&labels));
}

/// The end of a child of step `step` (item `item`) whose start the grid refused.
fn refused(step: &str, item: Option<u32>, child: RunId) -> Event {
    let error = TaskError { code: "not_found".into(), message: "no flow named transcode".into(), retryable: false };
    Event::ChildEnded {
        step: step.to_owned(),
        item,
        child,
        status: RunStatus::Failed,
        output: None,
        error: Some(error),
        refused: true,
        keeps_round: true,
    }
}

fn redriven() -> Event {
    Event::Redriven { reason: "deployed transcode".to_owned(), from: Vec::new(), queued: false }
}

#[test]
fn a_redriven_step_never_reuses_a_refused_childs_id() {
    let mut harness = Harness::start(PARENT, json!({"video": "v.mp4"}), 0);
    assert_eq!(harness.apply(10, refused("encode", None, child_id())), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Failed);
    let encode = harness.step("encode");
    assert_eq!((encode.attempts, encode.child_run), (0, None), "a refused start ran nothing");

    assert_eq!(harness.apply(100, redriven()), Applied::Accepted);
    let asked = starts(&harness.effects);
    let second = ParentRef::child_run_id("transcode", &RunId(RUN.into()), "encode", None, 1);
    assert_eq!(asked.len(), 1, "{:?}", harness.effects);
    assert_ne!(asked[0].child, child_id(), "the refused start may have made its child: its id is not used again");
    assert_eq!((asked[0].child.clone(), asked[0].round), (second.clone(), 1));
    assert_eq!(harness.run.open_child_starts(), asked, "a reload asks for the new child too");
    let encode = harness.step("encode");
    assert_eq!((encode.attempts, encode.child_run), (1, Some(second.clone())));

    // The refusal of the first start, answered again, no longer fails the step.
    assert_eq!(harness.apply(110, refused("encode", None, child_id())), Applied::Ignored("not the child of this step"));
    let applied = harness.apply(120, ended(second, RunStatus::Succeeded, Some(json!({"size": 7})), None));
    assert_eq!(applied, Applied::Accepted);
    assert_eq!(harness.run.view().output, Some(json!({"done": 7})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view(), "the history gives the same rounds again");
}

#[test]
fn a_loop_whose_next_child_is_refused_names_no_child_and_counts_the_children_that_ran() {
    let yaml = r##"
name: parent
steps:
  - kind: subflow
    id: poll
    flow: transcode
    repeat: { until: 'result.done', max_iterations: 5 }
"##;
    let child = |round| ParentRef::child_run_id("transcode", &RunId(RUN.into()), "poll", None, round);
    let mut harness = Harness::start(yaml, json!({}), 0);
    let first = Event::ChildEnded {
        step: "poll".to_owned(),
        item: None,
        child: child(0),
        status: RunStatus::Succeeded,
        output: Some(json!({"done": false})),
        error: None,
        refused: false,
        keeps_round: false,
    };
    assert_eq!(harness.apply(10, first), Applied::Accepted);
    assert_eq!(harness.step("poll").child_run, Some(child(1)));
    assert_eq!(harness.apply(20, refused("poll", None, child(1))), Applied::Accepted);
    let poll = harness.step("poll");
    assert_eq!((poll.status, poll.attempts, poll.child_run.clone()), (StepStatus::Failed, 1, None), "{poll:?}");

    assert_eq!(harness.apply(100, redriven()), Applied::Accepted);
    let asked: Vec<RunId> = starts(&harness.effects).into_iter().map(|start| start.child).collect();
    assert_eq!(asked, [child(2)], "iteration 0 again, in a round of its own");
    let poll = harness.step("poll");
    assert_eq!((poll.attempts, poll.child_run, poll.iteration), (2, Some(child(2)), Some(0)));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_redriven_item_never_reuses_a_refused_childs_id() {
    let yaml = FAN.replace("TOLERATED", "0");
    let mut harness = Harness::start(&yaml, json!({"videos": ["a"]}), 0);
    assert_eq!(harness.apply(10, refused("each", Some(0), item_id(0))), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Failed);
    assert_eq!(harness.step("each").attempts, 0, "a refused start ran nothing");

    assert_eq!(harness.apply(100, redriven()), Applied::Accepted);
    let asked: Vec<(RunId, u32)> =
        starts(&harness.effects).into_iter().map(|start| (start.child, start.round)).collect();
    let second = ParentRef::child_run_id("transcode", &RunId(RUN.into()), "each", Some(0), 1);
    assert_ne!(asked[0].0, item_id(0), "the refused start may have made its child: its id is not used again");
    assert_eq!(asked, [(second.clone(), 1)]);
    let each = harness.step("each");
    assert_eq!((each.attempts, each.child_round), (1, 1));
    assert_eq!(
        harness.apply(110, refused("each", Some(0), item_id(0))),
        Applied::Ignored("not the child of this step")
    );
    let done = Event::ChildEnded {
        step: "each".to_owned(),
        item: Some(0),
        child: second,
        status: RunStatus::Succeeded,
        output: Some(json!("A")),
        error: None,
        refused: false,
        keeps_round: false,
    };
    assert_eq!(harness.apply(120, done), Applied::Accepted);
    assert_eq!(harness.step("each").output, Some(json!(["A"])));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

/// A refusal as histories recorded it before refusals kept their round: without the flag.
fn refused_giving_its_round_back(step: &str, item: Option<u32>, child: RunId) -> Event {
    match refused(step, item, child) {
        Event::ChildEnded { step, item, child, status, output, error, refused, .. } => {
            Event::ChildEnded { step, item, child, status, output, error, refused, keeps_round: false }
        }
        _ => unreachable!("a refusal is a child's end"),
    }
}

#[test]
fn a_history_whose_refusal_gave_its_round_back_replays_to_the_childs_end() {
    let mut harness = Harness::start(PARENT, json!({"video": "v.mp4"}), 0);
    let applied = harness.apply(10, refused_giving_its_round_back("encode", None, child_id()));
    assert_eq!(applied, Applied::Accepted);
    let encode = harness.step("encode");
    assert_eq!((encode.status, encode.attempts, encode.child_run.clone()), (StepStatus::Failed, 0, None), "{encode:?}");

    assert_eq!(harness.apply(100, redriven()), Applied::Accepted);
    let asked: Vec<(RunId, u32)> =
        starts(&harness.effects).into_iter().map(|start| (start.child, start.round)).collect();
    assert_eq!(asked, [(child_id(), 0)], "the redrive asked for round 0 again, as the history goes on to show");
    let encode = harness.step("encode");
    assert_eq!((encode.attempts, encode.child_run), (1, Some(child_id())));

    let applied = harness.apply(120, ended(child_id(), RunStatus::Succeeded, Some(json!({"size": 7})), None));
    assert_eq!(applied, Applied::Accepted, "the recorded end of the round-0 child is taken");
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    assert_eq!(harness.run.view().output, Some(json!({"done": 7})));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_history_whose_refused_item_gave_its_round_back_replays_to_the_items_end() {
    let yaml = FAN.replace("TOLERATED", "0");
    let mut harness = Harness::start(&yaml, json!({"videos": ["a"]}), 0);
    let applied = harness.apply(10, refused_giving_its_round_back("each", Some(0), item_id(0)));
    assert_eq!(applied, Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Failed);
    assert_eq!(harness.step("each").attempts, 0, "a refused start ran nothing");

    assert_eq!(harness.apply(100, redriven()), Applied::Accepted);
    let asked: Vec<(RunId, u32)> =
        starts(&harness.effects).into_iter().map(|start| (start.child, start.round)).collect();
    assert_eq!(asked, [(item_id(0), 0)], "the redrive asked for round 0 again, as the history goes on to show");
    assert_eq!(harness.apply(120, item_ended(0, RunStatus::Succeeded, Some(json!("A")))), Applied::Accepted);
    assert_eq!(harness.run.status(), RunStatus::Succeeded);
    let each = harness.step("each");
    assert_eq!((each.attempts, each.output), (1, Some(json!(["A"]))));
    let (replayed, _) = replay(&harness);
    assert_eq!(replayed.view(), harness.run.view());
}

#[test]
fn a_child_end_encoded_without_keeps_round_decodes_as_a_refusal_that_gave_its_round_back() {
    let recorded = json!({
        "type": "child_ended",
        "step": "encode",
        "child": child_id(),
        "status": "failed",
        "error": {"code": "not_found", "message": "no flow named transcode", "retryable": false},
        "refused": true,
    });
    let expected = refused_giving_its_round_back("encode", None, child_id());
    let from_json: Event = serde_json::from_value(recorded.clone()).expect("an event recorded before the flag decodes");
    assert_eq!(from_json, expected);
    let bytes = rmp_serde::to_vec_named(&recorded).expect("encodes");
    let from_msgpack: Event = rmp_serde::from_slice(&bytes).expect("an event recorded before the flag decodes");
    assert_eq!(from_msgpack, expected);
    assert_eq!(serde_json::to_value(&expected).expect("encodes"), recorded, "a false flag is not written");

    let kept = refused("encode", None, child_id());
    let encoded = serde_json::to_value(&kept).expect("encodes");
    assert_eq!(encoded["keeps_round"], json!(true));
    let bytes = rmp_serde::to_vec_named(&kept).expect("encodes");
    assert_eq!(rmp_serde::from_slice::<Event>(&bytes).expect("decodes"), kept);
}
