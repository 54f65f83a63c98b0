//! Compiled plans shared by every shard of a coordinator. Versions are immutable, so a
//! plan once compiled is valid forever and never needs invalidating.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use flowgrid_model::{DefinitionError, Evaluator, FlowDefinition, FlowPlan, Limits};

/// `(flow, version) -> plan`.
pub struct PlanCache {
    evaluator: Arc<Evaluator>,
    limits: Limits,
    plans: RwLock<HashMap<(String, u32), Arc<FlowPlan>>>,
}

impl PlanCache {
    pub fn new(evaluator: Arc<Evaluator>, limits: Limits) -> Self {
        PlanCache { evaluator, limits, plans: RwLock::new(HashMap::new()) }
    }

    pub fn evaluator(&self) -> &Arc<Evaluator> {
        &self.evaluator
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn get(&self, flow: &str, version: u32) -> Option<Arc<FlowPlan>> {
        self.plans.read().expect("plan cache lock").get(&(flow.to_owned(), version)).cloned()
    }

    /// The plan of `definition` at `version`, compiled once.
    pub fn compile(&self, definition: &FlowDefinition, version: u32) -> Result<Arc<FlowPlan>, DefinitionError> {
        if let Some(plan) = self.get(&definition.name, version) {
            return Ok(plan);
        }
        let plan = Arc::new(FlowPlan::compile(definition.clone(), version, &self.evaluator, &self.limits)?);
        let mut plans = self.plans.write().expect("plan cache lock");
        Ok(plans.entry((definition.name.clone(), version)).or_insert(plan).clone())
    }
}
