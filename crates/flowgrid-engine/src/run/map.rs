//! Map steps, and subflow steps with `items`: fan-out over a list, at most
//! `max_concurrency` items in flight (tasks, or child runs), fan-in in item order.
//!
//! Invariants: items below `next_pending` have been started (or kept), the others are
//! `Pending`, or `Succeeded` when kept from before a redrive;
//! `active` counts `Active` items and never exceeds `max_concurrency`; once more items
//! have failed than the step tolerates, the step fails with `map_failed`, starts no further
//! item and abandons its active ones (their results are then ignored).

use std::sync::Arc;

use flowgrid_model::expr::json_kind;
use flowgrid_model::{Evaluator, Expr, ExprError, PlanStepKind, StepIndex, SubflowSpec};
use serde_json::Value;

use super::scope::Locals;
use super::state::{Item, MapState, Slot, Work};
use super::steps::oversized_input;
use super::{Context, Run};
use crate::{StepStatus, TaskError};

impl Run {
    /// Evaluates the items of map step `index` and starts the first of them.
    pub(super) fn start_map(
        &mut self,
        index: StepIndex,
        items: &Expr,
        max_concurrency: u32,
        context: &mut Context<'_>,
    ) {
        let value = match self.evaluate(context.evaluator, items, Locals::default()) {
            Ok(value) => value,
            Err(error) => return self.expression_failed(index, "items", &error, context),
        };
        let id = &self.plan.step(index).id;
        let Value::Array(list) = value else {
            let message = format!("map `{id}`: `items` gave {}, expected an array", json_kind(&value));
            let error = TaskError { code: "invalid_items".to_owned(), message, retryable: false };
            return self.step_failed(index, error, context);
        };
        let items_max = context.evaluator.limits().map_items_max;
        if list.len() > items_max {
            let message = format!("map `{id}`: `items` gave {} items, more than the limit of {items_max}", list.len());
            let error = TaskError { code: "too_many_items".to_owned(), message, retryable: false };
            return self.step_failed(index, error, context);
        }
        let total = u32::try_from(list.len()).expect("the item limit fits in u32");
        let state = self.state(index);
        // A map started again by a redrive keeps the items that succeeded before (the same
        // list: the items expression reads only what the redrive kept).
        let mut kept = match std::mem::replace(&mut state.work, Work::Idle) {
            Work::Map(before) if before.items.len() == list.len() => before.items.into_iter(),
            _ => Vec::new().into_iter(),
        };
        let mut succeeded = 0;
        let items = list
            .into_iter()
            .map(|value| match kept.next() {
                Some(Item::Succeeded(output)) => {
                    succeeded += 1;
                    Item::Succeeded(output)
                }
                _ => Item::Pending(value),
            })
            .collect();
        state.work = Work::Map(Box::new(MapState {
            items,
            first: state.attempts,
            total,
            next_pending: 0,
            max_concurrency: max_concurrency.max(1),
            active: 0,
            succeeded,
            failed: 0,
            prepared: None,
        }));
        self.fill_map(index, context);
        self.complete_map_if_done(index, context);
    }

    /// Item `item` of map step `index` succeeded with `output`.
    pub(super) fn item_succeeded(&mut self, index: StepIndex, item: u32, output: Value, context: &mut Context<'_>) {
        let map = self.map_mut(index);
        map.items[item as usize] = Item::Succeeded(output);
        map.active -= 1;
        map.succeeded += 1;
        self.continue_map(index, context);
    }

    /// Item `item` of map step `index` failed for good with `error`.
    pub(super) fn item_failed(&mut self, index: StepIndex, item: u32, error: TaskError, context: &mut Context<'_>) {
        match self.count_item_failure(index, item, error) {
            Some(tolerated) => self.fail_map(index, tolerated, context),
            None => self.continue_map(index, context),
        }
    }

    /// Records the failure of active item `item`; `Some(tolerated)` when more items failed
    /// than the step tolerates.
    fn count_item_failure(&mut self, index: StepIndex, item: u32, error: TaskError) -> Option<u32> {
        let tolerated = match &self.plan.step(index).kind {
            PlanStepKind::Map { tolerated_failures, .. } => *tolerated_failures,
            PlanStepKind::Subflow(SubflowSpec { items: Some(items), .. }) => items.tolerated_failures,
            _ => unreachable!("items belong to map steps"),
        };
        let map = self.map_mut(index);
        map.items[item as usize] = Item::Failed(error);
        map.active -= 1;
        map.failed += 1;
        (map.failed > tolerated).then_some(tolerated)
    }

    fn continue_map(&mut self, index: StepIndex, context: &mut Context<'_>) {
        self.fill_map(index, context);
        self.complete_map_if_done(index, context);
    }

    /// Starts pending items while fewer than `max_concurrency` are active: dispatches a
    /// task, or asks for a child run.
    fn fill_map(&mut self, index: StepIndex, context: &mut Context<'_>) {
        let plan = Arc::clone(&self.plan);
        let (input_expr, task) = match &plan.step(index).kind {
            PlanStepKind::Map { spec, .. } => (spec.input.as_ref(), Some(spec)),
            PlanStepKind::Subflow(spec) => (spec.input.as_ref(), None),
            _ => unreachable!("items belong to map and subflow steps"),
        };
        let children = task.is_none();
        while !self.status.is_terminal() {
            let map = self.map_mut(index);
            if map.next_pending >= map.total {
                map.prepared = None;
                return;
            }
            if map.active >= map.max_concurrency {
                return;
            }
            let item = map.next_pending;
            let value = match std::mem::replace(&mut map.items[item as usize], Item::Abandoned) {
                Item::Pending(value) => value,
                kept @ Item::Succeeded(_) => {
                    map.items[item as usize] = kept;
                    map.next_pending += 1;
                    continue;
                }
                _ => panic!("items from next_pending on are pending, or kept from before a redrive"),
            };
            map.next_pending += 1;
            map.active += 1;
            if let Some(error) = task.and_then(|spec| self.budget_spent(index, spec, item, context.now)) {
                match self.count_item_failure(index, item, error) {
                    Some(tolerated) => return self.fail_map(index, tolerated, context),
                    None => continue,
                }
            }
            let input = match input_expr {
                Some(expr) => match self.item_input(index, expr, &value, item, context.evaluator) {
                    Ok(input) => input,
                    Err(error) => return self.expression_failed(index, "input", &error, context),
                },
                None => value,
            };
            if let Some(error) = (!children).then(|| oversized_input(&input, context.evaluator.limits())).flatten() {
                match self.count_item_failure(index, item, error) {
                    Some(tolerated) => return self.fail_map(index, tolerated, context),
                    None => continue,
                }
            }
            let input = Arc::new(input);
            let cache_key = if children {
                None
            } else {
                let Ok(cache_key) = self.cache_key(index, &input, context) else { return };
                cache_key
            };
            let map = self.map_mut(index);
            let round = map.first;
            map.items[item as usize] = Item::Active(Slot::new(round, Arc::clone(&input), cache_key));
            if children {
                self.state(index).attempts += 1;
                self.ask_for_child(index, Some(item), input, round, context);
            } else {
                self.dispatch(index, Some(item), context);
            }
        }
    }

    /// Evaluates the `input` expression of map step `index` for item `item` (`value`), with
    /// the run input and the steps it reads converted once for all the items where the
    /// expression allows it: converting a large run input again for each item would cost
    /// more than the items' evaluations.
    fn item_input(
        &mut self,
        index: StepIndex,
        expr: &Expr,
        value: &Value,
        item: u32,
        evaluator: &Evaluator,
    ) -> Result<Value, ExprError> {
        let mut prepared = self.map_mut(index).prepared.take();
        let input = self.evaluate_item(evaluator, expr, &mut prepared, value, item);
        self.map_mut(index).prepared = prepared;
        input
    }

    /// When every item has ended, merges the outputs in item order and resolves the step.
    fn complete_map_if_done(&mut self, index: StepIndex, context: &mut Context<'_>) {
        if self.status.is_terminal() || self.steps[usize::from(index)].status != StepStatus::Running {
            return;
        }
        let map = self.map_mut(index);
        if !map.is_done() {
            return;
        }
        // Taken out of the items, not copied; put back if the step's `output` mapping
        // fails, so that a redrive keeps the items that succeeded.
        let merged = map
            .items
            .iter_mut()
            .map(|item| match item {
                Item::Succeeded(output) => std::mem::take(output),
                Item::Failed(_) => Value::Null,
                Item::Pending(_) | Item::Active(_) | Item::Abandoned => panic!("a finished map has only ended items"),
            })
            .collect();
        match self.mapped_output(index, Value::Array(merged), context) {
            Ok(output) => {
                self.map_mut(index).items.clear();
                self.succeed_with_output(index, output, context);
            }
            Err(failed) => {
                let (Value::Array(merged), error) = *failed else { unreachable!("the merged items are an array") };
                for (item, output) in self.map_mut(index).items.iter_mut().zip(merged) {
                    if let Item::Succeeded(kept) = item {
                        *kept = output;
                    }
                }
                self.expression_failed(index, "output", &error, context);
            }
        }
    }

    /// Too many items failed: cancel the timers of the active items and fail the step
    /// (which abandons those items).
    fn fail_map(&mut self, index: StepIndex, tolerated: u32, context: &mut Context<'_>) {
        let mut first_failure = None;
        let Work::Map(map) = &self.steps[usize::from(index)].work else { unreachable!("items belong to map steps") };
        let (failed, total) = (map.failed, map.total);
        for (item, entry) in map.items.iter().enumerate() {
            match entry {
                Item::Active(slot) => self.cancel_slot_timer(index, Some(item as u32), slot, context),
                Item::Failed(error) if first_failure.is_none() => first_failure = Some((item, error.clone())),
                _ => {}
            }
        }
        let (item, first) = first_failure.expect("a failed map has a failed item");
        let why = format!("map step `{}` of its parent run {} failed", self.plan.step(index).id, self.run_id);
        self.cancel_step_children(index, &why, context);
        let message = format!(
            "{failed} of {total} items failed, more than the {tolerated} tolerated; item {item} failed with `{}`: {}",
            first.code, first.message
        );
        let error = TaskError { code: "map_failed".to_owned(), message, retryable: false };
        self.step_failed(index, error, context);
    }

    /// Whether map step `step` holds a prepared scope for its items' input.
    #[cfg(test)]
    pub(crate) fn map_scope_prepared(&self, step: &str) -> bool {
        let index = self.plan.step_index(step).expect("a step of the plan");
        matches!(&self.steps[usize::from(index)].work, Work::Map(map) if map.prepared.is_some())
    }

    fn map_mut(&mut self, index: StepIndex) -> &mut MapState {
        match &mut self.state(index).work {
            Work::Map(map) => map,
            _ => panic!("map step {index} has no fan-out state"),
        }
    }
}
