//! Rebuilding a shard's memory from its store: the catalog, then every active run by
//! replaying its history through the engine.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flowgrid_engine::{ChildStart, Run, RunStart, TaskDispatch};
use flowgrid_model::{Evaluator, FlowDefinition, FlowPlan, Millis, RunId};
use flowgrid_store::{join_records, keys, Key, ShardStore, Value};

use super::actor::{ActiveRun, ShardActor};
use super::catalog::CatalogEntry;
use super::runs::attempt_opened;
use super::schedules::CATCH_UP_MS;
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::records::{self, CatalogRecord, EventRecord, StartRecord};

/// What a reloaded shard sends again once it serves: each is harmless if it was sent
/// before.
#[derive(Default)]
pub(super) struct Reloaded {
    /// Open tasks (duplicates are dropped by JetStream or ignored by attempt id).
    tasks: Vec<TaskDispatch>,
    /// Child runs that subflow steps wait for, with their depth (one that exists is not
    /// started again).
    child_starts: Vec<(ChildStart, u32)>,
    /// Keys of the messages left in the outbox, with their writes' numbers.
    outbox: Vec<(Vec<u8>, u64)>,
}

impl<S: ShardStore> ShardActor<S> {
    /// Loads the catalog, the active runs and the outbox; returns what to send again.
    pub(super) async fn reload(&mut self) -> Result<Reloaded> {
        self.reload_catalog().await?;
        self.load_gates().await?;
        let active = self.store.scan(keys::active_range(), usize::MAX, false).await?;
        let mut reloaded = Reloaded { outbox: self.load_outbox().await?, ..Reloaded::default() };
        let mut plans: HashMap<(String, u32), Arc<FlowPlan>> = HashMap::new();
        for (key, _) in active {
            let run_id = keys::decode_active(&key)?;
            let active_run = self.replay(&run_id, &mut plans).await?;
            for task in active_run.run.open_dispatches() {
                attempt_opened(&mut self.metrics, &task);
                reloaded.tasks.push(task);
            }
            let depth = super::outbox::child_depth(&active_run.run);
            reloaded.child_starts.extend(active_run.run.open_child_starts().into_iter().map(|start| (start, depth)));
            for (timer, due_ms) in active_run.run.armed_timers() {
                self.timers.arm(run_id.clone(), timer, due_ms);
            }
            self.runs.insert(run_id, Box::new(active_run));
            self.context.active_runs.fetch_add(1, Ordering::Relaxed);
            self.metrics.runs_active.increment(1.0);
        }
        Ok(reloaded)
    }

    /// Sends again what a reload found open; tasks oldest first (the earliest deadline),
    /// so that of the tasks of one cache key the one that went to a worker leads again.
    pub(super) async fn resume(&self, mut reloaded: Reloaded) {
        reloaded.tasks.sort_by_key(|task| task.deadline_ms);
        for task in reloaded.tasks {
            self.dispatch(task, None).await;
        }
        for (start, depth) in reloaded.child_starts {
            self.start_child(start, depth);
        }
        for message in reloaded.outbox {
            self.deliver(message);
        }
    }

    async fn reload_catalog(&mut self) -> Result<()> {
        for (key, value) in self.store.scan(keys::flow_paused_range(), usize::MAX, false).await? {
            let flow = keys::decode_flow_paused(&key)?;
            self.flow_pauses.insert(flow, records::decode("flow pause", &value)?);
        }
        let entries = join_records(self.store.scan(keys::catalog_range(), usize::MAX, false).await?)?;
        for (key, value) in entries {
            let (name, version) = keys::decode_catalog(&key)?;
            let record: CatalogRecord = records::decode("catalog entry", &value)?;
            let plan = self.context.plans.compile(&record.definition, version).map_err(|error| Error::Corrupt {
                what: format!("flow {name} version {version}"),
                message: error.to_string(),
            })?;
            self.catalog.entry(name).or_default().push(CatalogEntry { version, deployed_ms: record.deployed_ms, plan });
        }
        let latest: Vec<(Arc<FlowPlan>, Millis)> = self
            .catalog
            .values()
            .filter_map(|versions| versions.last())
            .map(|latest| (latest.plan.clone(), latest.deployed_ms))
            .collect();
        let now = now_ms();
        for (plan, deployed_ms) in latest {
            // No slot from before the version was deployed.
            self.arm_schedule_catching_up(&plan, now.saturating_sub(CATCH_UP_MS).max(deployed_ms), now);
            self.update_trigger(&plan);
            self.context.plans.set_latest(plan);
        }
        Ok(())
    }

    /// Rebuilds one run from its history.
    pub(super) async fn replay(
        &mut self,
        run_id: &RunId,
        plans: &mut HashMap<(String, u32), Arc<FlowPlan>>,
    ) -> Result<ActiveRun> {
        let (start, events) = read_history(&*self.store, run_id).await?;
        let plan = match plans.get(&(start.flow.to_string(), start.version)) {
            Some(plan) => plan.clone(),
            None => {
                let plan = self.pinned_plan(&start.flow, start.version).await?;
                plans.insert((start.flow.to_string(), start.version), plan.clone());
                plan
            }
        };
        rebuild(run_id, start, events, plan, self.context.plans.evaluator())
    }

    pub(super) async fn pinned_plan(&mut self, flow: &str, version: u32) -> Result<Arc<FlowPlan>> {
        if let Some(plan) = self.context.plans.get(flow, version) {
            self.pinned.insert((flow.to_owned(), version));
            return Ok(plan);
        }
        let key = keys::pinned_definition(flow, version);
        let bytes = self.store.get_chunked(&key).await?.ok_or_else(|| Error::Corrupt {
            what: format!("flow {flow} version {version}"),
            message: "pinned definition missing".to_owned(),
        })?;
        let definition: FlowDefinition = records::decode("pinned definition", &bytes)?;
        self.pinned.insert((flow.to_owned(), version));
        self.context.plans.compile(&definition, version).map_err(|error| Error::Corrupt {
            what: format!("flow {flow} version {version}"),
            message: error.to_string(),
        })
    }
}

/// A run's whole history: its start record, and the records of its events in order.
pub(super) async fn read_history<S: ShardStore>(
    store: &S,
    run_id: &RunId,
) -> Result<(StartRecord<'static>, std::vec::IntoIter<(Key, Value)>)> {
    let history = join_records(store.scan(keys::history_range(run_id), usize::MAX, false).await?)?;
    let mut records = history.into_iter();
    let (_, first) = records
        .next()
        .ok_or_else(|| Error::Corrupt { what: format!("run {run_id}"), message: "run without history".to_owned() })?;
    let start: StartRecord = records::decode("start record", &first)?;
    Ok((start, records))
}

/// The run as its history leaves it: `start`, then `events` through the engine, under
/// `plan` (the version the run started with).
pub(super) fn rebuild(
    run_id: &RunId,
    start: StartRecord<'_>,
    events: impl Iterator<Item = (Key, Value)>,
    plan: Arc<FlowPlan>,
    evaluator: &Evaluator,
) -> Result<ActiveRun> {
    let mut effects = Vec::new();
    let begin = RunStart {
        run_id: run_id.clone(),
        input: start.input.into_owned(),
        labels: start.labels.map(Cow::into_owned).unwrap_or_default(),
        now: start.now_ms,
        queued: start.queued,
        start_at: start.start_at_ms,
    };
    let mut run = Run::start(plan, evaluator, begin, &mut effects);
    if let Some(parent) = start.parent {
        run.set_parent(parent.into_owned());
    }
    let mut next_seq = 1;
    for (key, value) in events {
        let (_, seq) = keys::decode_history(&key)?;
        let record: EventRecord = records::decode("history record", &value)?;
        effects.clear();
        run.apply(evaluator, record.now_ms, &record.event, &mut effects);
        next_seq = seq + 1;
    }
    Ok(ActiveRun { run, next_seq })
}
