//! Expression scopes and evaluation.
//!
//! A step's expressions see the run input and only the steps they reference
//! (`Expr::step_refs`), each as `{"status", "output", "error"}`; the flow output sees
//! every step. Every evaluator call of the engine goes through this module.

use flowgrid_model::{Evaluator, Expr, ExprError, Millis, Prepared, Scope, StepIndex};
use serde_json::{json, Map, Value};

use super::Run;
use crate::{StepStatus, TaskError};

/// Values an expression may read besides the run input and the steps.
#[derive(Default)]
pub(super) struct Locals<'a> {
    pub item: Option<&'a Value>,
    pub index: Option<u32>,
    pub result: Option<&'a Value>,
    pub iteration: Option<u32>,
    pub previous: Option<&'a Value>,
}

impl Run {
    /// Evaluates `expr` with the steps it references in scope.
    pub(super) fn evaluate(&self, evaluator: &Evaluator, expr: &Expr, locals: Locals<'_>) -> Result<Value, ExprError> {
        let steps = self.steps_scope(Some(&expr.step_refs));
        let scope = self.scope(&steps, &locals);
        evaluator.eval(expr, &scope)
    }

    /// Evaluates `expr` for one item (`value`, at `index`) of a fan-out with `prepared`, the
    /// scope (the run input and the steps it references) converted once for all the items:
    /// converted here when it holds none, and not used where the expression cannot be
    /// prepared (the item then has a scope of its own).
    pub(super) fn evaluate_item(
        &self,
        evaluator: &Evaluator,
        expr: &Expr,
        prepared: &mut Option<Prepared>,
        value: &Value,
        index: u32,
    ) -> Result<Value, ExprError> {
        if !expr.preparable() {
            return self.evaluate(
                evaluator,
                expr,
                Locals { item: Some(value), index: Some(index), ..Locals::default() },
            );
        }
        if prepared.is_none() {
            let steps = self.steps_scope(Some(&expr.step_refs));
            *prepared = evaluator.prepare(expr, &self.scope(&steps, &Locals::default()))?;
        }
        let prepared = prepared.as_ref().expect("a preparable expression is prepared");
        evaluator.eval_prepared(expr, prepared, Some(value), Some(index))
    }

    /// Evaluates a condition with the steps it references in scope.
    pub(super) fn evaluate_bool(
        &self,
        evaluator: &Evaluator,
        expr: &Expr,
        locals: Locals<'_>,
    ) -> Result<bool, ExprError> {
        let steps = self.steps_scope(Some(&expr.step_refs));
        let scope = self.scope(&steps, &locals);
        evaluator.eval_bool(expr, &scope)
    }

    /// Evaluates a wait's length in milliseconds with the steps it references in scope.
    pub(super) fn evaluate_wait_ms(&self, evaluator: &Evaluator, expr: &Expr) -> Result<u64, ExprError> {
        let steps = self.steps_scope(Some(&expr.step_refs));
        let scope = self.scope(&steps, &Locals::default());
        evaluator.eval_wait_ms(expr, &scope)
    }

    /// Evaluates a wait's `until` at `now`: the milliseconds left to the time it gives.
    pub(super) fn evaluate_wait_until(
        &self,
        evaluator: &Evaluator,
        expr: &Expr,
        now: Millis,
    ) -> Result<u64, ExprError> {
        let steps = self.steps_scope(Some(&expr.step_refs));
        let scope = self.scope(&steps, &Locals::default());
        evaluator.eval_wait_until(expr, &scope, now)
    }

    /// Evaluates `expr` with every step in scope (the flow output, a failure handler's input).
    pub(super) fn evaluate_over_all_steps(
        &self,
        evaluator: &Evaluator,
        expr: &Expr,
        locals: Locals<'_>,
    ) -> Result<Value, ExprError> {
        let steps = self.steps_scope(None);
        let scope = self.scope(&steps, &locals);
        evaluator.eval(expr, &scope)
    }

    fn scope<'a>(&'a self, steps: &'a Map<String, Value>, locals: &Locals<'a>) -> Scope<'a> {
        Scope {
            input: Some(&self.input),
            steps: Some(steps),
            item: locals.item,
            index: locals.index,
            result: locals.result,
            iteration: locals.iteration,
            previous: locals.previous,
        }
    }

    /// The `steps` object: the steps named in `refs`, or all of them.
    fn steps_scope(&self, refs: Option<&[String]>) -> Map<String, Value> {
        let mut steps = Map::new();
        match refs {
            Some(refs) => {
                for id in refs {
                    if let Some(index) = self.plan.step_index(id) {
                        steps.insert(id.clone(), self.step_entry(index));
                    }
                }
            }
            None => {
                for (position, step) in self.plan.steps.iter().enumerate() {
                    steps.insert(step.id.clone(), self.step_entry(position as StepIndex));
                }
            }
        }
        steps
    }

    /// `{"status", "output", "error"}` of step `index`. `output` is `()` for a step that did
    /// not succeed: a signal kept for a pending step (`keep_early`) is its output only once
    /// it succeeds with it, and is dropped if the run ends first.
    fn step_entry(&self, index: StepIndex) -> Value {
        let state = &self.steps[usize::from(index)];
        let output = match (state.status, &state.output) {
            (StepStatus::Succeeded, Some(output)) => output.clone(),
            _ => Value::Null,
        };
        json!({
            "status": state.status.as_str(),
            "output": output,
            "error": state.error.as_deref().map(error_value).unwrap_or(Value::Null),
        })
    }
}

pub(super) fn error_value(error: &TaskError) -> Value {
    json!({ "code": error.code, "message": error.message, "retryable": error.retryable })
}

/// The error code of a broken expression: no catch takes it.
pub(super) const EXPRESSION_ERROR: &str = "expression_error";

/// The run error for an expression that failed in `field` of step `step`.
pub(super) fn expression_error(step: &str, field: &str, error: &ExprError) -> TaskError {
    TaskError {
        code: EXPRESSION_ERROR.to_owned(),
        message: format!("step `{step}`, field `{field}`: {error}"),
        retryable: false,
    }
}
