//! A flow's failure handler: which ends start it, with what input, labels and key.

use std::sync::Arc;

use flowgrid_model::{Labels, RunId, ON_FAILURE_OF_LABEL};
use serde_json::json;

use super::support::{error, evaluator, plan, Harness, RUN};
use crate::{Effect, Event, HandlerStart, Run, RunStart, RunStatus};

const FLOW: &str = r##"
name: checkout
on_failure: { flow: refund }
steps:
  - { kind: task, id: charge, pool: cpu, task: charge, retry: { max_attempts: 1 } }
"##;

fn handlers(effects: &[Effect]) -> Vec<HandlerStart> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::StartFailureHandler(start) => Some(start.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_failed_run_starts_its_handler_once_per_end_with_the_failure_as_input() {
    let mut harness = Harness::start(FLOW, json!({"order": 7}), 0);
    assert_eq!(harness.run.view().on_failure_run, None, "a running run starts no handler");
    harness.fail(10, "charge", None, 1, error("declined", false));
    let started = handlers(&harness.effects);
    assert_eq!(started.len(), 1, "{:?}", harness.effects);
    let handler = &started[0];
    assert_eq!((handler.flow.as_str(), handler.round), ("refund", 0));
    assert_eq!(handler.idempotency_key, format!("on_failure/{RUN}/0"));
    assert_eq!(
        handler.input,
        json!({
            "run_id": RUN, "flow": "checkout", "version": 1, "status": "failed",
            "error": {"code": "declined", "message": "declined happened", "retryable": false},
            "input": {"order": 7},
        })
    );
    assert_eq!(handler.labels.get(ON_FAILURE_OF_LABEL).map(String::as_str), Some(RUN));
    // The handler start comes before the run's end, and the view names the handler's run.
    let position = |wanted: fn(&Effect) -> bool| harness.effects.iter().position(wanted).expect("emitted");
    assert!(
        position(|e| matches!(e, Effect::StartFailureHandler(_)))
            < position(|e| matches!(e, Effect::RunFinished { .. }))
    );
    let expected = RunId::from_idempotency_key("refund", &handler.idempotency_key);
    assert_eq!(harness.run.view().on_failure_run, Some(expected));

    // Redriven and failed again: a handler of its own, under the next round.
    harness.apply(20, Event::Redriven { reason: "retry".into(), from: Vec::new(), queued: false });
    assert_eq!(harness.run.view().on_failure_run, None);
    harness.fail(30, "charge", None, 2, error("declined", false));
    let again = handlers(&harness.effects);
    assert_eq!(again.iter().map(|start| start.round).collect::<Vec<_>>(), vec![1]);
    assert_eq!(again[0].idempotency_key, format!("on_failure/{RUN}/1"));
}

#[test]
fn only_the_ends_it_names_start_it_and_a_success_never() {
    let mut succeeded = Harness::start(FLOW, json!({}), 0);
    succeeded.succeed(5, "charge", None, 1, json!("ok"));
    assert_eq!(succeeded.run.status(), RunStatus::Succeeded);
    assert!(handlers(&succeeded.all_effects).is_empty());

    let mut cancelled = Harness::start(FLOW, json!({}), 0);
    cancelled.apply(5, Event::CancelRequested { reason: "user".into() });
    assert!(handlers(&cancelled.all_effects).is_empty(), "cancelled is not in the default statuses");

    let on_cancel = FLOW.replace("{ flow: refund }", "{ flow: refund, statuses: [cancelled] }");
    let mut cancelled = Harness::start(&on_cancel, json!({}), 0);
    cancelled.apply(5, Event::CancelRequested { reason: "user".into() });
    assert_eq!(handlers(&cancelled.all_effects)[0].input["status"], json!("cancelled"));
    let mut failed = Harness::start(&on_cancel, json!({}), 0);
    failed.fail(5, "charge", None, 1, error("declined", false));
    assert!(handlers(&failed.all_effects).is_empty(), "failed is not named");
}

#[test]
fn the_handler_input_expression_reads_the_failure_and_the_steps() {
    let flow = r##"
name: checkout
on_failure:
  flow: refund
  input: '#{ order: input.order, why: result.error.code, quote: steps.quote.output }'
steps:
  - { kind: transform, id: quote, output: '42' }
  - { kind: task, id: charge, after: [quote], pool: cpu, task: charge, retry: { max_attempts: 1 } }
"##;
    let mut harness = Harness::start(flow, json!({"order": 7}), 0);
    harness.fail(10, "charge", None, 1, error("declined", false));
    assert_eq!(handlers(&harness.effects)[0].input, json!({"order": 7, "why": "declined", "quote": 42}));

    // An input that fails to evaluate: the handler still starts, with the failure and why.
    let broken = flow.replace("result.error.code,", "result.nothing + 1,");
    let mut harness = Harness::start(&broken, json!({"order": 7}), 0);
    harness.fail(10, "charge", None, 1, error("declined", false));
    let input = &handlers(&harness.effects)[0].input;
    assert_eq!(input["status"], json!("failed"));
    assert!(input["input_error"].as_str().is_some_and(|why| why.starts_with("on_failure.input:")), "{input}");
}

#[test]
fn a_handler_run_starts_no_handler_and_keeps_the_failed_runs_labels() {
    let labels: Labels = (0..16).map(|n| (format!("k{n:02}"), n.to_string())).collect();
    let start = RunStart { run_id: RunId(RUN.into()), input: json!({}), labels, now: 0, queued: false, start_at: None };
    let mut effects = Vec::new();
    let mut run = Run::start(Arc::clone(&plan(FLOW)), evaluator(), start, &mut effects);
    let failed =
        Event::TaskFailed { attempt: super::support::attempt("charge", None, 1), error: error("declined", false) };
    run.apply(evaluator(), 10, &failed, &mut effects);
    let handler = handlers(&effects).pop().expect("a handler");
    assert_eq!(handler.labels.len(), 16, "at most 16 labels: the last one gave way to the link");
    assert!(handler.labels.contains_key("k00") && !handler.labels.contains_key("k15"));

    let handler_labels: Labels = [(ON_FAILURE_OF_LABEL.to_owned(), "other".to_owned())].into();
    let start = RunStart {
        run_id: RunId(RUN.into()),
        input: json!({}),
        labels: handler_labels,
        now: 0,
        queued: false,
        start_at: None,
    };
    let mut effects = Vec::new();
    let mut run = Run::start(Arc::clone(&plan(FLOW)), evaluator(), start, &mut effects);
    run.apply(evaluator(), 10, &failed, &mut effects);
    assert_eq!(run.status(), RunStatus::Failed);
    assert!(handlers(&effects).is_empty(), "a handler's failure starts no handler");
    assert_eq!(run.view().on_failure_run, None);
}

/// A handler's input over a payload (a run input and an error of nearly a payload each,
/// or an `input` expression that takes too much) gives way to the failure without the
/// run's input, its error cut to fit: the start carries no more than a payload.
#[test]
fn a_handler_input_over_a_payload_is_the_failure_without_the_run_input() {
    let payload_max = evaluator().limits().payload_bytes_max;
    let large = "x".repeat(payload_max - 1_000);
    let mut harness = Harness::start(FLOW, json!({ "blob": large }), 0);
    let mut huge = error("declined", false);
    huge.message = "e".repeat(payload_max - 100);
    harness.fail(10, "charge", None, 1, huge);
    let input = &handlers(&harness.effects)[0].input;
    let bytes = start_input_bytes(input);
    assert!(bytes <= payload_max, "{bytes} bytes");
    assert_eq!((input["status"].as_str(), input.get("input")), (Some("failed"), None), "{input:.300}");
    assert!(input["input_error"].as_str().is_some_and(|why| why.contains("over the limit of")), "{input:.300}");
    let message = input["error"]["message"].as_str().unwrap_or_default();
    assert!(message.ends_with("[cut to fit the handler's input]") && message.len() > payload_max / 8, "{bytes}");

    // An expression that takes too much: the failure, with the run's input if it fits.
    let taking = FLOW.replace("{ flow: refund }", "{ flow: refund, input: 'input.blob + input.blob' }");
    let mut harness = Harness::start(&taking, json!({ "blob": "y".repeat(payload_max / 2 + 1) }), 0);
    harness.fail(10, "charge", None, 1, error("declined", false));
    let input = &handlers(&harness.effects)[0].input;
    assert_eq!(input["error"]["message"], json!("declined happened"));
    assert!(input.get("input").is_none() && input["input_error"].is_string(), "{input:.300}");

    // A run input as deep as a start may be is a level too deep inside the failure.
    let depth_max = evaluator().limits().nesting_depth_max;
    let deep = (1..depth_max).fold(json!([]), |inner, _| json!([inner]));
    assert_eq!(flowgrid_model::limits::nesting_depth(&deep), depth_max);
    let mut harness = Harness::start(FLOW, deep, 0);
    harness.fail(10, "charge", None, 1, error("declined", false));
    let input = &handlers(&harness.effects)[0].input;
    assert!(input.get("input").is_none(), "{input}");
    assert!(input["input_error"].as_str().is_some_and(|why| why.contains("levels deep")), "{input}");
}

/// The size the API measures a start's input by: MessagePack, as `rmp_serde` writes it.
fn start_input_bytes(input: &serde_json::Value) -> usize {
    rmp_serde::to_vec_named(input).expect("a JSON value encodes").len()
}

/// A handler's input is measured as the API measures a start's: as MessagePack, in which a
/// float takes 9 bytes where its JSON may take 4 (`0.5,`). A run whose input is a list of
/// floats just within a payload (as the API took it) fails: its failure is about half a
/// payload as JSON and over a payload as MessagePack. Measured as JSON, it was sent, the
/// API refused it for good, and the handler was dropped.
#[test]
fn a_float_heavy_handler_input_is_measured_as_the_api_measures_a_start() {
    let payload_max = evaluator().limits().payload_bytes_max;
    let scores = json!(vec![0.5; (payload_max - 16) / 9]);
    assert!(start_input_bytes(&scores) <= payload_max, "a run input the API takes");
    let mut harness = Harness::start(FLOW, scores, 0);
    harness.fail(10, "charge", None, 1, error("declined", false));
    let input = &handlers(&harness.effects)[0].input;
    let bytes = start_input_bytes(input);
    assert!(
        bytes <= payload_max,
        "the handler's start carries {bytes} bytes of input (as the API counts them; {} as JSON), over the limit of \
         {payload_max}: the API refuses it for good",
        flowgrid_model::limits::json_bytes(input)
    );
    assert_eq!((input["status"].as_str(), input.get("input")), (Some("failed"), None), "{input:.300}");
    assert_eq!(input["error"]["message"], json!("declined happened"));
    let why = input["input_error"].as_str().unwrap_or_default();
    assert!(why.contains("as MessagePack"), "{why}");
}

/// The handler input's size is counted as `rmp_serde` writes it, at every boundary of
/// MessagePack's markers, without writing it.
#[test]
fn the_counted_size_of_a_value_is_its_messagepack_size() {
    let mut values = vec![json!(null), json!(true), json!(0.5), json!(-0.0), json!(f64::MAX)];
    for boundary in [0x7f_i64, 0xff, 0xffff, 0xffff_ffff] {
        values.extend([json!(boundary), json!(boundary + 1)]);
    }
    for boundary in [-32_i64, -128, -32_768, -2_147_483_648] {
        values.extend([json!(boundary), json!(boundary - 1)]);
    }
    values.extend([json!(u64::MAX), json!(i64::MIN)]);
    for len in [0, 15, 16, 31, 32, 255, 256, 65_535, 65_536] {
        values.push(json!(format!("{}{}", "é".repeat(len / 2), "x".repeat(len % 2))));
        values.push(json!(vec![1; len]));
        let fields: serde_json::Map<String, serde_json::Value> = (0..len).map(|n| (n.to_string(), json!(n))).collect();
        values.push(serde_json::Value::Object(fields));
    }
    values.push(json!({"key": [1, -1, 1.5, "text", {"nested": null}], "": ""}));
    for value in &values {
        let counted = flowgrid_model::limits::msgpack_bytes(value);
        assert_eq!(counted, start_input_bytes(value), "{value:.80}");
    }
}

/// A handler's child runs carry its `flowgrid.on_failure_of` label, as every child carries
/// its parent's labels, so their failures start no handler either: a handler that calls
/// (through a `subflow` step) a flow whose `on_failure` names the handler cannot start
/// itself without end, each handler's child failing into the next handler, nor double
/// with every round through a handler with two such steps.
#[test]
fn a_handlers_child_runs_carry_its_label_so_a_chain_through_sub_flows_stops() {
    let refund = "name: refund\nsteps:\n  - { kind: subflow, id: pay_back, flow: payments }\n";
    let labels: Labels = [(ON_FAILURE_OF_LABEL.to_owned(), "failed-run".to_owned())].into();
    let start = RunStart { run_id: RunId(RUN.into()), input: json!({}), labels, now: 0, queued: false, start_at: None };
    let mut effects = Vec::new();
    Run::start(plan(refund), evaluator(), start, &mut effects);
    let child = effects
        .iter()
        .find_map(|effect| match effect {
            Effect::StartChild(start) => Some(start.clone()),
            _ => None,
        })
        .expect("the subflow step asks for its child at once");
    assert_eq!(child.labels.get(ON_FAILURE_OF_LABEL).map(String::as_str), Some("failed-run"), "{child:?}");
}
