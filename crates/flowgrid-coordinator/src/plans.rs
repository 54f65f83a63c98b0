//! Compiled plans shared by every shard of a coordinator. Versions are immutable, so a
//! plan once compiled is valid forever and never needs invalidating.
//!
//! Which version is a flow's latest changes with deploys, so it is known here only for the
//! flows whose catalog shard this coordinator serves: the catalog actor publishes it after
//! loading and after each deploy commits, and withdraws it when it stops. A start without
//! a version then needs no round trip to the catalog shard.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use flowgrid_model::{DefinitionError, Evaluator, FlowDefinition, FlowPlan, Limits};

/// `(flow, version) -> plan`.
pub struct PlanCache {
    evaluator: Arc<Evaluator>,
    limits: Limits,
    plans: RwLock<HashMap<(String, u32), Arc<FlowPlan>>>,
    /// Latest version per flow, for flows whose catalog shard is served here.
    latest: RwLock<HashMap<String, Arc<FlowPlan>>>,
}

impl PlanCache {
    pub fn new(evaluator: Arc<Evaluator>, limits: Limits) -> Self {
        PlanCache { evaluator, limits, plans: RwLock::new(HashMap::new()), latest: RwLock::new(HashMap::new()) }
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

    /// The latest version of `flow`, when its catalog shard is served here.
    pub fn latest(&self, flow: &str) -> Option<Arc<FlowPlan>> {
        self.latest.read().expect("plan cache lock").get(flow).cloned()
    }

    /// Publishes `plan` as its flow's latest version (its catalog shard committed it).
    pub fn set_latest(&self, plan: Arc<FlowPlan>) {
        self.latest.write().expect("plan cache lock").insert(plan.name.clone(), plan);
    }

    /// Withdraws the latest versions of `flows` (their catalog shard stops being served here).
    pub fn forget_latest<'a>(&self, flows: impl IntoIterator<Item = &'a String>) {
        let mut latest = self.latest.write().expect("plan cache lock");
        for flow in flows {
            latest.remove(flow);
        }
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
