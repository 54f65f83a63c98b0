//! The flow catalog: each flow's versions live in the shard its name hashes to, so the
//! catalog scales with the shards and every deploy is an epoch-fenced commit.
//!
//! Versions are immutable and numbered from 1. Deploying a definition equal to the latest
//! version returns that version instead of creating a new one.

use std::ops::Bound;
use std::sync::Arc;

use flowgrid_model::{FlowDefinition, FlowPlan, Millis};
use flowgrid_proto::{ApiError, ErrorCode, FlowDeployed, FlowInfo, FlowPause, FlowPaused, FlowSummary, PauseFlow};
use flowgrid_store::{keys, ShardStore};

use serde::{Deserialize, Serialize};

use super::actor::ShardActor;
use super::batch::Batch;
use crate::clock::now_ms;
use crate::records::{self, CatalogRecord};

/// A page of flows (a shard's, and the API's reply) ends before this many bytes of
/// summaries (as JSON), with one flow at least: far below the largest NATS message.
const FLOWS_PAGE_BYTES: usize = 256 << 10;
/// A flow's description in a listing, in characters at most (`flow get` gives the whole).
const SUMMARY_DESCRIPTION_CHARS: usize = 1_024;

/// Flows in name order, from one shard or merged from several.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowsPage {
    pub flows: Vec<FlowSummary>,
    /// More flows follow the last one (the page is full); none follows when `false`.
    pub more: bool,
}

impl FlowsPage {
    /// The shards' pages as one: in name order up to the first name a full page stopped at
    /// (past it, that shard's flows were not looked at), at most `limit` flows and
    /// [`FLOWS_PAGE_BYTES`]. Merging pages one at a time gives what merging them at once does.
    pub fn merge(pages: impl IntoIterator<Item = FlowsPage>, limit: usize) -> FlowsPage {
        let mut flows = Vec::new();
        let mut stop: Option<String> = None;
        for page in pages {
            if let Some(last) = page.flows.last().filter(|_| page.more) {
                if stop.as_ref().is_none_or(|stop| last.name < *stop) {
                    stop = Some(last.name.clone());
                }
            }
            flows.extend(page.flows);
        }
        if let Some(stop) = &stop {
            flows.retain(|flow: &FlowSummary| flow.name <= *stop);
        }
        flows.sort_by(|left, right| left.name.cmp(&right.name));
        let fits = fitting(flows.iter(), limit);
        let more = stop.is_some() || fits < flows.len();
        flows.truncate(fits);
        FlowsPage { flows, more }
    }

    /// The flows of a whole listing (an older coordinator's answer) named after `after`,
    /// their descriptions cut as a page's are, as a page that [`FlowsPage::merge`] cuts to
    /// size.
    pub fn after(flows: Vec<FlowSummary>, after: Option<&str>) -> FlowsPage {
        let flows = flows
            .into_iter()
            .filter(|flow| after.is_none_or(|after| flow.name.as_str() > after))
            .map(|flow| FlowSummary { description: flow.description.as_deref().map(summary_description), ..flow })
            .collect();
        FlowsPage { flows, more: false }
    }
}

/// How many of `flows`, from the first, make a page: at most `limit`, and one at least
/// within [`FLOWS_PAGE_BYTES`].
fn fitting<'a>(flows: impl Iterator<Item = &'a FlowSummary>, limit: usize) -> usize {
    let mut bytes = 0;
    let mut count = 0;
    for flow in flows {
        bytes += serde_json::to_vec(flow).map_or(0, |encoded| encoded.len());
        if count == limit || (count > 0 && bytes > FLOWS_PAGE_BYTES) {
            break;
        }
        count += 1;
    }
    count
}

/// `description` cut to [`SUMMARY_DESCRIPTION_CHARS`], ending in `…` where it was.
fn summary_description(description: &str) -> String {
    match description.char_indices().nth(SUMMARY_DESCRIPTION_CHARS) {
        Some((end, _)) => format!("{}…", &description[..end]),
        None => description.to_owned(),
    }
}

/// One deployed version.
pub(super) struct CatalogEntry {
    pub version: u32,
    pub deployed_ms: Millis,
    pub plan: Arc<FlowPlan>,
}

impl<S: ShardStore> ShardActor<S> {
    pub(super) fn deploy(&mut self, definition: FlowDefinition, batch: &mut Batch) -> Result<FlowDeployed, ApiError> {
        // Stored with the defaults it runs with, and compared so with the latest version.
        let definition = flowgrid_model::with_deploy_defaults(definition);
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
        flowgrid_model::check_new(&definition, self.context.plans.evaluator(), self.context.plans.limits())
            .map_err(refused)?;
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
            // The slots of the pause stay skipped if the shard reloads within its catch-up.
            batch.writes.set(keys::flow_resumed(&name), records::encode(&now_ms()));
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

    /// The shard's flows named after `after`, in name order: at most `limit`, and within
    /// [`FLOWS_PAGE_BYTES`] unless `bytes_unbounded` (an older coordinator's listing).
    pub(super) fn flows_page(&self, after: Option<&str>, limit: usize, bytes_unbounded: bool) -> FlowsPage {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let summaries = self.catalog.range::<str, _>((from, Bound::Unbounded)).filter_map(|(name, versions)| {
            let latest = versions.last()?;
            let definition = &latest.plan.definition;
            Some(FlowSummary {
                name: name.clone(),
                latest_version: latest.version,
                deployed_ms: latest.deployed_ms,
                steps: latest.plan.steps.len() as u32,
                description: definition.description.as_deref().map(summary_description),
                schedule: definition.schedule.clone(),
                trigger: definition.trigger.clone(),
                paused: self.flow_pauses.get(name).cloned(),
            })
        });
        if bytes_unbounded {
            return FlowsPage { flows: summaries.collect(), more: false };
        }
        // One past the page, to tell whether more follow.
        let mut flows: Vec<FlowSummary> = summaries.take(limit.saturating_add(1)).collect();
        let fits = fitting(flows.iter(), limit);
        let more = fits < flows.len();
        flows.truncate(fits);
        FlowsPage { flows, more }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, description: Option<String>) -> FlowSummary {
        FlowSummary {
            name: name.to_owned(),
            latest_version: 1,
            deployed_ms: 0,
            steps: 1,
            description,
            schedule: None,
            trigger: None,
            paused: None,
        }
    }

    fn page(names: &[&str], more: bool) -> FlowsPage {
        FlowsPage { flows: names.iter().map(|name| summary(name, None)).collect(), more }
    }

    #[test]
    fn a_whole_listing_pages_as_a_shard_s_page_does() {
        let all: Vec<FlowSummary> = ["c", "a", "d", "b"].iter().map(|name| summary(name, None)).collect();
        let merged = FlowsPage::merge([FlowsPage::after(all.clone(), Some("a"))], 2);
        assert_eq!((names(&merged), merged.more), (vec!["b", "c"], true));
        let merged = FlowsPage::merge([FlowsPage::after(all, Some("c")), page(&["e"], false)], 2);
        assert_eq!((names(&merged), merged.more), (vec!["d", "e"], false));
        // An older coordinator sends descriptions whole: cut here as a page's are.
        let page = FlowsPage::after(vec![summary("a", Some("x".repeat(2_000)))], None);
        let cut = page.flows[0].description.as_deref().unwrap();
        assert_eq!(cut.chars().count(), SUMMARY_DESCRIPTION_CHARS + 1);
    }

    fn names(page: &FlowsPage) -> Vec<&str> {
        page.flows.iter().map(|flow| flow.name.as_str()).collect()
    }

    #[test]
    fn merged_pages_stop_where_a_full_page_stopped() {
        let pages = || vec![page(&["b", "d", "f", "g"], false), page(&["a", "c", "e"], true), page(&[], false)];
        let merged = FlowsPage::merge(pages(), 10);
        assert_eq!(names(&merged), ["a", "b", "c", "d", "e"], "past `e` the second shard was not looked at");
        assert!(merged.more);
        // As the API merges them: one answer at a time.
        let mut one_by_one = FlowsPage::default();
        for next in pages() {
            one_by_one = FlowsPage::merge([one_by_one, next], 10);
        }
        assert_eq!(one_by_one, merged);

        let merged = FlowsPage::merge(vec![page(&["b"], false), page(&["a", "c"], false)], 2);
        assert_eq!((names(&merged), merged.more), (vec!["a", "b"], true), "cut at the limit: more follow");
        let merged = FlowsPage::merge(vec![page(&["b"], false), page(&["a"], false)], 2);
        assert_eq!((names(&merged), merged.more), (vec!["a", "b"], false), "a page that holds the rest");
    }

    #[test]
    fn a_page_ends_before_its_bytes_pass_the_bound_with_one_flow_at_least() {
        let long = "€".repeat(SUMMARY_DESCRIPTION_CHARS);
        let flows: Vec<FlowSummary> = (0..200).map(|n| summary(&format!("flow-{n:03}"), Some(long.clone()))).collect();
        let merged = FlowsPage::merge([FlowsPage { flows, more: false }], 1_000);
        assert!(merged.more && merged.flows.len() < 200, "{} flows in one page", merged.flows.len());
        let bytes: usize = merged.flows.iter().map(|flow| serde_json::to_vec(flow).unwrap().len()).sum();
        assert!(bytes <= FLOWS_PAGE_BYTES && bytes + 4 * long.len() > FLOWS_PAGE_BYTES, "{bytes} bytes");

        let huge = summary("huge", Some("x".repeat(2 * FLOWS_PAGE_BYTES)));
        let merged = FlowsPage::merge([FlowsPage { flows: vec![huge, summary("next", None)], more: false }], 10);
        assert_eq!((names(&merged), merged.more), (vec!["huge"], true), "a flow larger than a page is a page");
    }

    #[test]
    fn a_listed_description_is_cut_past_its_bound() {
        let exact = "é".repeat(SUMMARY_DESCRIPTION_CHARS);
        assert_eq!(summary_description(&exact), exact);
        let cut = summary_description(&format!("{exact}and more"));
        assert_eq!(cut, format!("{exact}…"));
    }
}
