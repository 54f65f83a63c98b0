//! A flow's failure handler: when a run ends in one of `on_failure.statuses`, the engine
//! asks the driver to start a run of the handler flow, with the failure (or what the
//! handler's `input` makes of it) as its input.
//!
//! The handler run's id follows from the failed run and its round (its redrives so far),
//! through the start's idempotency key: the driver may send the start again after a crash,
//! each end of a redriven run starts a handler of its own, and the run's view names the
//! handler's run without storing anything. A handler run (labelled
//! [`ON_FAILURE_OF_LABEL`]) starts no handler of its own.

use flowgrid_model::labels::{LABELS_MAX, LABEL_KEY_BYTES_MAX, LABEL_VALUE_BYTES_MAX};
use flowgrid_model::limits::{msgpack_bytes, nesting_depth, Limits};
use flowgrid_model::{FailureEnd, RunId, ON_FAILURE_OF_LABEL};
use serde_json::{json, Value};

use super::scope::{error_value, Locals};
use super::{Context, Run};
use crate::{Effect, HandlerStart, RunStatus};

impl Run {
    /// The id of the handler run this run's end starts, if it starts one.
    pub fn failure_handler_run(&self) -> Option<RunId> {
        let (flow, _, key) = self.handler_key()?;
        Some(RunId::from_idempotency_key(flow, &key))
    }

    /// The handler's flow, the run's round and the start's idempotency key, when the run
    /// ended in a status its flow's `on_failure` takes and is not a handler itself.
    fn handler_key(&self) -> Option<(&str, u32, String)> {
        let handler = self.plan.on_failure.as_ref()?;
        let end = match self.status {
            RunStatus::Failed => FailureEnd::Failed,
            RunStatus::TimedOut => FailureEnd::TimedOut,
            RunStatus::Cancelled => FailureEnd::Cancelled,
            RunStatus::Running | RunStatus::Succeeded => return None,
        };
        let is_handler = self.labels().is_some_and(|labels| labels.contains_key(ON_FAILURE_OF_LABEL));
        if !handler.statuses.contains(&end) || is_handler {
            return None;
        }
        let round = self.redriven().map_or(0, |redriven| redriven.times);
        Some((&handler.flow, round, format!("on_failure/{}/{round}", self.run_id)))
    }

    /// Asks the driver to start the failure handler, if the run's end starts one.
    pub(super) fn start_failure_handler(&self, context: &mut Context<'_>) {
        let Some((flow, round, idempotency_key)) = self.handler_key() else { return };
        let handler = self.plan.on_failure.as_ref().expect("a handler key needs a handler");
        let failure = || {
            json!({
                "run_id": self.run_id,
                "flow": self.plan.name,
                "version": self.plan.version,
                "status": self.status.as_str(),
                "error": self.error().map(error_value).unwrap_or(Value::Null),
                "input": self.input.as_ref(),
            })
        };
        let input = match &handler.input {
            None => failure(),
            Some(expr) => {
                let locals = Locals { result: Some(&failure()), ..Locals::default() };
                match self.evaluate_over_all_steps(context.evaluator, expr, locals) {
                    Ok(input) => input,
                    // The run has failed already; the handler still runs, told why its
                    // input is the failure itself.
                    Err(error) => {
                        let mut input = failure();
                        input["input_error"] = json!(format!("on_failure.input: {error}"));
                        input
                    }
                }
            }
        };
        let input = within_limits(input, failure, context.evaluator.limits());
        let mut labels = self.labels().cloned().unwrap_or_default();
        while labels.len() >= LABELS_MAX {
            labels.pop_last();
        }
        labels.insert(ON_FAILURE_OF_LABEL.to_owned(), self.run_id.to_string());
        context.effects.push(Effect::StartFailureHandler(HandlerStart {
            failed: self.run_id.clone(),
            round,
            flow: flow.to_owned(),
            input,
            idempotency_key,
            labels,
        }));
    }
}

/// Bytes a handler's start takes besides its input, at most: its labels (as many as a run
/// has, each as long as a label may be, with their MessagePack markers), its flow's name,
/// its idempotency key and its field names, with room to spare. The input is bounded by the
/// payload limit less this, so that the whole start is within the limit too: then neither
/// the API nor the NATS server (which carries a payload and some more) refuses it.
const HANDLER_START_ENVELOPE_BYTES: usize = LABELS_MAX * (LABEL_KEY_BYTES_MAX + LABEL_VALUE_BYTES_MAX + 8) + 2 * 1024;

/// The handler's input if a start may carry it (a payload's size, less what the rest of
/// the start takes, as MessagePack, the encoding in which the API measures it, and nesting
/// depth); else the failure without the run's input, saying why, its error's message cut
/// to fit. The failure wraps the run's input a level deeper, with the error next to it, and
/// an `input` expression may take every step of a large map: a start refused for good
/// would lose the handler, a record too large would fail the commit.
fn within_limits(input: Value, failure: impl FnOnce() -> Value, limits: &Limits) -> Value {
    let (bytes, depth) = (msgpack_bytes(&input), nesting_depth(&input));
    let payload_max = limits.payload_bytes_max.saturating_sub(HANDLER_START_ENVELOPE_BYTES);
    let why = if bytes > payload_max {
        format!(
            "the handler's input is {bytes} bytes as MessagePack, over the limit of {payload_max} a failure \
             handler's start may carry"
        )
    } else if depth > limits.nesting_depth_max {
        format!("the handler's input is nested {depth} levels deep, over the limit of {}", limits.nesting_depth_max)
    } else {
        return input;
    };
    drop(input);
    let mut failure = failure();
    if let Some(fields) = failure.as_object_mut() {
        fields.remove("input");
    }
    failure["input_error"] = json!(format!(
        "{why}: this is the failure without the run's input (read the run for it); give `on_failure.input` an \
         expression that picks less"
    ));
    let over = msgpack_bytes(&failure).saturating_sub(payload_max);
    if let (true, Some(Value::String(message))) = (over > 0, failure.pointer_mut("/error/message")) {
        flowgrid_model::limits::cut_to_fit(message, over, ERROR_CUT_MARK);
    }
    failure
}

/// Ends an error message [`within_limits`] cut.
const ERROR_CUT_MARK: &str = " [cut to fit the handler's input]";
