//! Rebuilding a shard's memory from its store: the catalog, then every active run by
//! replaying its history through the engine.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use flowgrid_engine::{ChildStart, Run, RunStart, TaskDispatch};
use flowgrid_model::{Evaluator, FlowDefinition, FlowPlan, Millis, RunId};
use flowgrid_store::{keys, Key, KeyRange, ShardStore, Value};
use tracing::error;

use super::actor::{ActiveRun, ShardActor};
use super::catalog::CatalogEntry;
use super::runs::attempt_opened;
use super::schedules::CATCH_UP_MS;
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::records::{self, CatalogRecord, EventRecord, RunRecord, StartRecord};

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
            let active_run = match self.replay(&run_id, &mut plans).await {
                Ok(active_run) => active_run,
                Err(error) if is_bad_data(&error) => {
                    self.hold_back(run_id, &error);
                    continue;
                }
                Err(error) => return Err(error),
            };
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

    /// Keeps an active run that cannot be rebuilt from its history out of memory (see
    /// [`ShardActor::held_back`]): its shard serves the other runs meanwhile.
    fn hold_back(&mut self, run_id: RunId, error: &Error) {
        error!(
            shard = %self.shard,
            run = %run_id,
            error = %error,
            "cannot load the run from the store: it is held back as it is, requests about it are refused, and the \
             shard serves its other runs; a coordinator of a version that can read it loads it when it next takes \
             the shard"
        );
        self.metrics.runs_held_back.increment(1.0);
        self.held_back.insert(run_id, error.to_string());
    }

    /// Sends again what a reload found open; tasks oldest first, by when each was
    /// dispatched (those dispatched at once in the order they were found), so that of the
    /// tasks of one cache key the one that went to a worker leads again. Not by deadline:
    /// a task dispatched later under a shorter timeout would lead, and call a worker too.
    pub(super) async fn resume(&self, mut reloaded: Reloaded) {
        reloaded.tasks.sort_by_key(|task| task.opened_ms);
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
        // Catalog entries read per page, at most, and their bytes: whole records, each read
        // in one transaction of the store, a page at a time.
        const CATALOG_PAGE_RECORDS: usize = 1_000;
        const CATALOG_PAGE_BYTES: usize = 8 * 1024 * 1024;
        let mut range = keys::catalog_range();
        loop {
            let page = self.store.scan_records(range.clone(), CATALOG_PAGE_RECORDS, CATALOG_PAGE_BYTES).await?;
            let next = page.records.last().map(|(last, _)| keys::chunks_range(last).end);
            for (key, value) in page.records {
                let (name, version) = keys::decode_catalog(&key)?;
                let record: CatalogRecord = records::decode("catalog entry", &value)?;
                let plan = self.context.plans.compile(&record.definition, version).map_err(|error| Error::Corrupt {
                    what: format!("flow {name} version {version}"),
                    message: error.to_string(),
                })?;
                let entry = CatalogEntry { version, deployed_ms: record.deployed_ms, plan };
                self.catalog.entry(name).or_default().push(entry);
            }
            match next {
                Some(next) if page.more => range.begin = next,
                _ => break,
            }
        }
        let latest: Vec<(Arc<FlowPlan>, Millis)> = self
            .catalog
            .values()
            .filter_map(|versions| versions.last())
            .map(|latest| (latest.plan.clone(), latest.deployed_ms))
            .collect();
        let mut resumed: HashMap<String, Millis> = HashMap::new();
        for (key, value) in self.store.scan(keys::flow_resumed_range(), usize::MAX, false).await? {
            resumed.insert(keys::decode_flow_resumed(&key)?, records::decode("flow resume", &value)?);
        }
        let now = now_ms();
        for (plan, deployed_ms) in latest {
            // No slot from before the version was deployed, nor from a pause since.
            let resumed_ms = resumed.get(&plan.name).copied().unwrap_or(0);
            let from_ms = now.saturating_sub(CATCH_UP_MS).max(deployed_ms).max(resumed_ms);
            self.arm_schedule_catching_up(&plan, from_ms, now);
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
        // The store shared, not borrowed from `self`: the plan may have to be read meanwhile.
        let store = Arc::clone(&self.store);
        let (start, events) = read_history(&*store, run_id).await?;
        let plan = match plans.get(&(start.flow.to_string(), start.version)) {
            Some(plan) => plan.clone(),
            None => {
                let plan = self.pinned_plan(&start.flow, start.version).await?;
                plans.insert((start.flow.to_string(), start.version), plan.clone());
                plan
            }
        };
        rebuild(run_id, start, events, plan, self.context.plans.evaluator()).await
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

/// Whether `error` says that a run's own records are at fault (they do not decode, or its
/// version's definition no longer compiles), not the store: reading again would fail again.
fn is_bad_data(error: &Error) -> bool {
    matches!(
        error,
        Error::Corrupt { .. }
            | Error::Store(flowgrid_store::Error::Corrupt { .. } | flowgrid_store::Error::MalformedKey { .. })
    )
}

/// Records one page of a replayed history holds at most, and the bytes (as stored) past
/// which it ends early: a long history (a map of 100,000 items, an attempt's progress
/// reports) is replayed a page at a time, never held in memory whole.
const REPLAY_PAGE_RECORDS: usize = 1_000;
const REPLAY_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// The records of a run's history after its start record, in order, read a page at a time.
pub(super) struct History<'a, S> {
    store: &'a S,
    page: std::vec::IntoIter<(Key, Value)>,
    /// What is left to read after the page; `None` once the page is the last.
    rest: Option<KeyRange>,
}

impl<S: ShardStore> History<'_, S> {
    async fn read_page(&mut self) -> Result<()> {
        let Some(range) = self.rest.take() else { return Ok(()) };
        let page = self.store.scan_records(range.clone(), REPLAY_PAGE_RECORDS, REPLAY_PAGE_BYTES).await?;
        if page.more {
            if let Some((last, _)) = page.records.last() {
                self.rest = Some(KeyRange { begin: keys::chunks_range(last).end, end: range.end });
            }
        }
        self.page = page.records.into_iter();
        Ok(())
    }

    /// The next record, `None` after the last.
    pub(super) async fn next(&mut self) -> Result<Option<(Key, Value)>> {
        if let Some(record) = self.page.next() {
            return Ok(Some(record));
        }
        self.read_page().await?;
        Ok(self.page.next())
    }
}

/// A run's history: its start record, and the records of its events in order.
pub(super) async fn read_history<'a, S: ShardStore>(
    store: &'a S,
    run_id: &RunId,
) -> Result<(StartRecord<'static>, History<'a, S>)> {
    let mut history = History { store, page: Vec::new().into_iter(), rest: Some(keys::history_range(run_id)) };
    let (_, first) = history
        .next()
        .await?
        .ok_or_else(|| Error::Corrupt { what: format!("run {run_id}"), message: "run without history".to_owned() })?;
    let start: StartRecord = records::decode("start record", &first)?;
    Ok((start, history))
}

/// The run as its history leaves it: `start`, then `events` through the engine, under
/// `plan` (the version the run started with).
/// Rebuilds an ended run from its history, checked against its run `record`.
pub(super) async fn rebuild_ended<S: ShardStore>(
    store: &S,
    run_id: &RunId,
    record: &RunRecord,
    plan: Arc<FlowPlan>,
    evaluator: &Evaluator,
) -> Result<ActiveRun> {
    let (start, events) = read_history(store, run_id).await?;
    if start.flow != record.flow || start.version != record.version {
        return Err(Error::Corrupt {
            what: format!("run {run_id}"),
            message: format!(
                "its history starts version {} of flow {}, its record says version {} of flow {}",
                start.version, start.flow, record.version, record.flow
            ),
        });
    }
    rebuild(run_id, start, events, plan, evaluator).await
}

pub(super) async fn rebuild<S: ShardStore>(
    run_id: &RunId,
    start: StartRecord<'_>,
    mut events: History<'_, S>,
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
    while let Some((key, value)) = events.next().await? {
        let (_, seq) = keys::decode_history(&key)?;
        let record: EventRecord = records::decode("history record", &value)?;
        effects.clear();
        run.apply(evaluator, record.now_ms, &record.event, &mut effects);
        next_seq = seq + 1;
    }
    Ok(ActiveRun { run, next_seq })
}

#[cfg(test)]
mod tests {
    use flowgrid_engine::Event;
    use flowgrid_model::{AttemptId, Limits};
    use flowgrid_store::{StoreLimits, WriteBatch};
    use serde_json::json;

    use crate::shard::testing::{test_shard, TestShard};

    use super::*;

    /// A history longer than a page (in records, and in bytes: some records are chunked) is
    /// read whole, each record once and in order, and replayed.
    #[tokio::test]
    async fn a_history_of_several_pages_is_replayed_whole_and_in_order() {
        let TestShard { _dir, file, epoch } = test_shard().await;
        let limits = StoreLimits::default();
        let evaluator = Evaluator::new(&Limits::default());
        let yaml = "name: long\nsteps:\n  - { id: a, kind: task, pool: p, task: t }\n";
        let definition = flowgrid_model::parse_definition(yaml, &Limits::default()).unwrap();
        let plan = Arc::new(FlowPlan::compile(definition, 1, &evaluator, &Limits::default()).unwrap());
        let run_id = RunId::from_idempotency_key("long", "k");
        let start = StartRecord {
            flow: "long".into(),
            version: 1,
            input: Cow::Owned(json!({})),
            now_ms: 1,
            epoch: epoch.0,
            parent: None,
            labels: None,
            queued: false,
            start_at_ms: None,
        };
        let mut batch = WriteBatch::new();
        batch.insert_chunked(&keys::history(&run_id, 0), &records::encode(&start), &limits);
        let reports = 2 * REPLAY_PAGE_RECORDS as u64 + 500;
        let attempt = AttemptId { run_id: run_id.clone(), step: "a".into(), item: None, attempt: 1 };
        // Every 40th record 150 KB (chunked), 9 MB in all: a page ends by its bytes too.
        let large = "p".repeat(150 * 1024);
        for seq in 1..=reports {
            let details = if seq % 40 == 0 { json!({ "seq": seq, "pad": large }) } else { json!({ "seq": seq }) };
            let event = Event::TaskProgress { attempt: attempt.clone(), details };
            let record = EventRecord { now_ms: 1 + seq, event, epoch: epoch.0 };
            batch.insert_chunked(&keys::history(&run_id, seq), &records::encode(&record), &limits);
            if seq % 500 == 0 {
                // Commits of a few MB each: one would be over a transaction.
                file.commit(epoch, std::mem::take(&mut batch)).await.unwrap();
            }
        }
        file.commit(epoch, batch).await.unwrap();

        let (_, mut events) = read_history(&file, &run_id).await.unwrap();
        let mut seqs = Vec::new();
        while let Some((key, _)) = events.next().await.unwrap() {
            seqs.push(keys::decode_history(&key).unwrap().1);
        }
        assert_eq!(seqs, (1..=reports).collect::<Vec<_>>(), "each record once, in order");
        let (start, events) = read_history(&file, &run_id).await.unwrap();
        let rebuilt = rebuild(&run_id, start, events, plan, &evaluator).await.unwrap();
        assert_eq!(rebuilt.next_seq, reports + 1);
        let view = rebuilt.run.view();
        let last = view.steps[0].progress.as_ref().map(|progress| progress["seq"].clone());
        assert_eq!(last, Some(json!(reports)), "the last report, read last");
    }
}
