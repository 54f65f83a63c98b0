//! The task cache, as the engine sees it: a step with `cache` gives each task a key when
//! it starts (failing like its `input` when the key expression fails), every dispatch
//! carries the key for the driver to look up, and a worker's success is handed back to
//! be stored. A stored result comes back as [`crate::Event::TaskCached`], which closes
//! the attempt as a worker's success would; it is not stored again.

use std::sync::Arc;

use flowgrid_model::StepIndex;
use serde_json::Value;

use super::steps::task_spec;
use super::{Context, Run};
use crate::Effect;

/// The key expression failed; the step and the run failed with it.
pub(super) struct KeyFailed;

impl Run {
    /// What identifies the result of step `index`'s task with `input` in the cache;
    /// `None` when the step does not cache its results.
    pub(super) fn cache_key(
        &mut self,
        index: StepIndex,
        input: &Arc<Value>,
        context: &mut Context<'_>,
    ) -> Result<Option<Arc<Value>>, KeyFailed> {
        let plan = Arc::clone(&self.plan);
        let Some(cache) = task_spec(&plan.step(index).kind).and_then(|spec| spec.cache.as_ref()) else {
            return Ok(None);
        };
        if cache.key.is_none() {
            return Ok(Some(Arc::clone(input)));
        }
        match cache.key_of(context.evaluator, input) {
            Ok(key) => Ok(Some(Arc::new(key))),
            Err(error) => {
                self.expression_failed(index, "cache.key", &error, context);
                Err(KeyFailed)
            }
        }
    }

    /// Hands a worker's `output` for the slot of step `index` (and `item`) to the driver
    /// to store, when the step caches its results.
    pub(super) fn store_in_cache(
        &self,
        index: StepIndex,
        item: Option<u32>,
        output: &Value,
        context: &mut Context<'_>,
    ) {
        let Some(key) = &self.slot(index, item).cache_key else { return };
        let spec = task_spec(&self.plan.step(index).kind).expect("only task and map steps have cache keys");
        context.effects.push(Effect::CacheResult {
            pool: Arc::clone(&spec.pool),
            task: Arc::clone(&spec.task),
            key: Arc::clone(key),
            output: output.clone(),
        });
    }
}
