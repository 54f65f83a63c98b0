//! Compiled plans shared by every shard of a coordinator. Versions are immutable, so a
//! plan once compiled is valid forever and never needs invalidating; but a flow deployed
//! again and again would keep every version's plan, so the cache holds
//! [`PLANS_CACHED_MAX`] (those used most and last: `quick_cache`'s S3-FIFO). A plan it let
//! go is read from the catalog (or a run's pinned definition) and compiled again when it is
//! needed; a run holds its own plan.
//!
//! Which version is a flow's latest changes with deploys, so it is known here only for the
//! flows whose catalog shard this coordinator serves: the catalog actor publishes it after
//! loading and after each deploy commits, and withdraws it when it stops. A start without
//! a version then needs no round trip to the catalog shard.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use flowgrid_model::{DefinitionError, Evaluator, FlowDefinition, FlowPlan, Limits};

/// Plans the cache keeps at most, of any flows and versions. A plan may take as much as a
/// definition (up to 1 MiB) and more.
pub const PLANS_CACHED_MAX: usize = 1_024;

/// `(flow, version) -> plan`, at most [`PLANS_CACHED_MAX`] of them.
pub struct PlanCache {
    evaluator: Arc<Evaluator>,
    limits: Limits,
    plans: quick_cache::sync::Cache<(String, u32), Arc<FlowPlan>>,
    /// Latest version per flow, for flows whose catalog shard is served here; not bounded
    /// by [`PLANS_CACHED_MAX`] (one per flow of the catalog shards served here).
    latest: RwLock<HashMap<String, Arc<FlowPlan>>>,
}

impl PlanCache {
    pub fn new(evaluator: Arc<Evaluator>, limits: Limits) -> Self {
        PlanCache {
            evaluator,
            limits,
            plans: quick_cache::sync::Cache::new(PLANS_CACHED_MAX),
            latest: RwLock::new(HashMap::new()),
        }
    }

    pub fn evaluator(&self) -> &Arc<Evaluator> {
        &self.evaluator
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The cached plan of `flow` at `version`, if it is cached: `None` once it was let go
    /// (the caller reads and compiles it again).
    pub fn get(&self, flow: &str, version: u32) -> Option<Arc<FlowPlan>> {
        self.plans.get(&(flow.to_owned(), version))
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

    /// Caches `plan` as its flow version's, in place of any other; past
    /// [`PLANS_CACHED_MAX`], a plan used less lately is let go.
    pub fn insert(&self, plan: Arc<FlowPlan>) {
        self.plans.insert((plan.name.clone(), plan.version), plan);
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

    /// A flow deployed 5,000 times (a CI deploying each commit) leaves at most
    /// [`PLANS_CACHED_MAX`] plans cached, a plan used all along among them.
    /// Its latest version is still served, and a plan let go is compiled again.
    #[test]
    fn the_cache_keeps_the_plans_used_last_and_the_latest_versions() {
        let limits = Limits::default();
        let plans = PlanCache::new(Arc::new(Evaluator::new(&limits)), limits);
        let definition = definition("a");
        let first = plans.compile(&definition, 1).expect("compiles");
        for version in 2..=5_000 {
            let plan = plans.compile(&definition, version).expect("compiles");
            plans.set_latest(plan);
            assert!(plans.get("f", 1).is_some(), "a plan used all along is kept (version {version})");
        }
        let cached = plans.plans.len();
        assert!(cached <= PLANS_CACHED_MAX, "{cached} plans cached");
        assert_eq!(plans.latest("f").map(|plan| plan.version), Some(5_000), "the latest version is served");
        assert!(Arc::ptr_eq(&plans.get("f", 1).expect("kept"), &first));
        let let_go: Vec<u32> =
            (2..=5_000).filter(|&version| plans.plans.peek(&("f".to_owned(), version)).is_none()).collect();
        assert!(let_go.len() >= 5_000 - PLANS_CACHED_MAX, "{} of 4,999 versions let go", let_go.len());
        let again = plans.compile(&definition, let_go[0]).expect("compiles");
        let cached_again = plans.get("f", let_go[0]);
        assert!(cached_again.is_some_and(|plan| Arc::ptr_eq(&plan, &again)), "compiled again and cached");
    }
}
