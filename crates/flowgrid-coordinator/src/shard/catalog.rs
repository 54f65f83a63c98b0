//! The flow catalog: each flow's versions live in the shard its name hashes to, so the
//! catalog scales with the shards and every deploy is an epoch-fenced commit.
//!
//! Versions are immutable and numbered from 1. Deploying a definition equal to the latest
//! version returns that version instead of creating a new one.

use std::sync::Arc;

use flowgrid_model::{FlowDefinition, FlowPlan, Millis};
use flowgrid_proto::{ApiError, ErrorCode, FlowDeployed, FlowInfo, FlowPause, FlowPaused, FlowSummary, PauseFlow};
use flowgrid_store::{keys, ShardStore};

use super::actor::ShardActor;
use super::batch::Batch;
use crate::clock::now_ms;
use crate::records::{self, CatalogRecord};

/// One deployed version.
pub(super) struct CatalogEntry {
    pub version: u32,
    pub deployed_ms: Millis,
    pub plan: Arc<FlowPlan>,
}

impl<S: ShardStore> ShardActor<S> {
    pub(super) fn deploy(&mut self, definition: FlowDefinition, batch: &mut Batch) -> Result<FlowDeployed, ApiError> {
        let name = definition.name.clone();
        let versions = self.catalog.get(&name);
        if let Some(latest) = versions.and_then(|versions| versions.last()) {
            if latest.plan.definition == definition {
                return Ok(FlowDeployed { name, version: latest.version, created: false });
            }
        }
        let version = versions.and_then(|versions| versions.last()).map_or(1, |latest| latest.version + 1);
        let refused = |error: flowgrid_model::DefinitionError| {
            let mut api_error = ApiError::new(ErrorCode::InvalidDefinition, error.to_string());
            api_error.issues = error.issues();
            api_error
        };
        // A new version only: the deployed one, sent again, stays what it is.
        flowgrid_model::check_new(&definition).map_err(refused)?;
        let plan = self.context.plans.compile_uncached(&definition, version).map_err(refused)?;
        let deployed_ms = now_ms();
        let record = CatalogRecord { deployed_ms, definition };
        batch.writes.set_chunked(&keys::catalog(&name, version), &records::encode(&record), &self.context.store_limits);
        batch.deployed.push(plan.clone());
        self.catalog.entry(name.clone()).or_default().push(CatalogEntry { version, deployed_ms, plan });
        Ok(FlowDeployed { name, version, created: true })
    }

    /// Pauses (`pause`) or resumes the runs the flow's schedule and trigger start. The
    /// schedule and trigger follow after the commit, as after a deploy.
    pub(super) fn pause_flow(
        &mut self,
        request: PauseFlow,
        pause: bool,
        batch: &mut Batch,
    ) -> Result<FlowPaused, ApiError> {
        let PauseFlow { name, reason } = request;
        let latest = self.entry(&name, None)?.plan.clone();
        if self.flow_pauses.contains_key(&name) == pause {
            return Ok(FlowPaused { name, paused: pause, applied: false });
        }
        if pause {
            let reason = if reason.is_empty() { "paused through the API".to_owned() } else { reason };
            let record = FlowPause { since_ms: now_ms(), reason };
            batch.writes.set(keys::flow_paused(&name), records::encode(&record));
            self.flow_pauses.insert(name.clone(), record);
        } else {
            batch.writes.clear(keys::flow_paused(&name));
            self.flow_pauses.remove(&name);
        }
        batch.deployed.push(latest);
        Ok(FlowPaused { name, paused: pause, applied: true })
    }

    /// The plan of a version (the latest when `version` is `None`).
    pub(super) fn plan(&self, name: &str, version: Option<u32>) -> Result<Arc<FlowPlan>, ApiError> {
        self.entry(name, version).map(|entry| entry.plan.clone())
    }

    pub(super) fn flow_info(&self, name: &str, version: Option<u32>) -> Result<FlowInfo, ApiError> {
        let entry = self.entry(name, version)?;
        Ok(FlowInfo {
            name: name.to_owned(),
            version: entry.version,
            deployed_ms: entry.deployed_ms,
            definition: entry.plan.definition.clone(),
            paused: self.flow_pauses.get(name).cloned(),
        })
    }

    pub(super) fn flow_summaries(&self) -> Vec<FlowSummary> {
        self.catalog
            .iter()
            .filter_map(|(name, versions)| {
                let latest = versions.last()?;
                Some(FlowSummary {
                    name: name.clone(),
                    latest_version: latest.version,
                    deployed_ms: latest.deployed_ms,
                    steps: latest.plan.steps.len() as u32,
                    description: latest.plan.definition.description.clone(),
                    schedule: latest.plan.definition.schedule.clone(),
                    trigger: latest.plan.definition.trigger.clone(),
                    paused: self.flow_pauses.get(name).cloned(),
                })
            })
            .collect()
    }

    fn entry(&self, name: &str, version: Option<u32>) -> Result<&CatalogEntry, ApiError> {
        let versions = self.catalog.get(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no flow named {name:?}; deploy it first (`flowgrid flow deploy FILE`)"),
            )
        })?;
        match version {
            None => versions
                .last()
                .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("flow {name:?} has no version"))),
            Some(wanted) => versions.iter().find(|entry| entry.version == wanted).ok_or_else(|| {
                let latest = versions.last().map_or(0, |entry| entry.version);
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("flow {name:?} has no version {wanted}; versions are 1 to {latest}"),
                )
            }),
        }
    }
}
