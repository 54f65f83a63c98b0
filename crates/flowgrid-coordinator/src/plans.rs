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

    /// The plan of `definition` (committed) at `version`, compiled once. A cached plan of
    /// another definition under the same version is replaced: the committed one is the
    /// version.
    pub fn compile(&self, definition: &FlowDefinition, version: u32) -> Result<Arc<FlowPlan>, DefinitionError> {
        if let Some(plan) = self.get(&definition.name, version).filter(|plan| plan.definition == *definition) {
            return Ok(plan);
        }
        let plan = self.compile_uncached(definition, version)?;
        self.insert(Arc::clone(&plan));
        Ok(plan)
    }

    /// The plan of `definition` at `version`, not cached: a deploy's, until its commit
    /// makes it the version ([`PlanCache::insert`]). A deploy whose commit failed leaves
    /// nothing behind, so a later deploy of another definition as the same version is not
    /// answered with this one's plan.
    pub fn compile_uncached(
        &self,
        definition: &FlowDefinition,
        version: u32,
    ) -> Result<Arc<FlowPlan>, DefinitionError> {
        Ok(Arc::new(FlowPlan::compile(definition.clone(), version, &self.evaluator, &self.limits)?))
    }

    /// Caches `plan` as its flow version's, in place of any other.
    pub fn insert(&self, plan: Arc<FlowPlan>) {
        self.plans.write().expect("plan cache lock").insert((plan.name.clone(), plan.version), plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(step: &str) -> FlowDefinition {
        let yaml = format!("name: f\nsteps:\n  - {{ id: {step}, kind: succeed }}\n");
        flowgrid_model::parse_definition(&yaml, &Limits::default()).expect("a definition")
    }

    /// A deploy's plan is cached once its commit made it the version: a deploy whose commit
    /// failed leaves nothing, and a cached plan of another definition gives way to the
    /// committed one. Before, a later deploy of another definition as the same version was
    /// answered with the failed deploy's plan, and its runs ran that.
    #[test]
    fn only_a_committed_definition_is_its_versions_plan() {
        let limits = Limits::default();
        let plans = PlanCache::new(Arc::new(Evaluator::new(&limits)), limits);
        let (failed, committed) = (definition("a"), definition("b"));
        plans.compile_uncached(&failed, 2).expect("compiles");
        assert!(plans.get("f", 2).is_none(), "a deploy's plan is not cached before its commit");

        plans.insert(plans.compile_uncached(&failed, 2).expect("compiles"));
        let plan = plans.compile(&committed, 2).expect("compiles");
        assert_eq!(plan.definition, committed);
        assert_eq!(plans.get("f", 2).map(|plan| plan.definition.clone()), Some(committed.clone()));
        assert!(Arc::ptr_eq(&plans.compile(&committed, 2).expect("compiles"), &plan), "compiled once");
    }
}
