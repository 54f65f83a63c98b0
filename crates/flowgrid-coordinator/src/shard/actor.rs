//! The shard actor's loop: gather a batch, commit it, then carry out its effects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgrid_engine::{Run, TimerKey};
use flowgrid_model::{AttemptId, Epoch, Millis, RunId, ShardId};
use flowgrid_proto::{ApiError, Encoding, ErrorCode, Reply, ResultAck, TasksCancelled};
use flowgrid_store::ShardStore;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::batch::{Batch, DeferredReply, Dispatch, RefusedResult, ResultReply};
use super::catalog::CatalogEntry;
use super::runs::attempt_closed;
use super::timers::TimerWheel;
use super::{Command, NodeContext, ShardHandle};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::metrics::{self, ShardMetrics};

/// Pause before reloading a shard after a failed commit: a transient store failure gets
/// a moment to clear, and a persistent one does not spin the shard.
const RELOAD_PAUSE: Duration = Duration::from_millis(200);

/// The longest an idle actor sleeps towards a due time before it reads the clock again.
const SLEEP_MAX: Duration = Duration::from_secs(10);

/// A batch stops taking events once it holds this share (1/n) of a commit's bytes: the
/// event after (a payload of up to 1 MiB, a run's end) still fits in the commit.
const BATCH_BYTES_SHARE: usize = 4;

/// Attempts one notice of cancelled tasks names at most: an attempt id is up to ~300 bytes
/// of JSON, so a notice stays within the NATS server's default `max_payload` (1 MB) when
/// a map with thousands of items in flight ends.
const CANCELLED_PER_NOTICE_MAX: usize = 2_000;

/// One run in memory: its state and where its history goes on. Everything else a run
/// needs follows from its state, so that a waiting run costs little memory.
pub(super) struct ActiveRun {
    pub run: Run,
    /// Sequence number of the next history record.
    pub next_seq: u64,
}

pub(super) struct ShardActor<S: ShardStore> {
    pub shard: ShardId,
    pub epoch: Epoch,
    /// The lease term the shard was acquired in: it serves only while that term lasts.
    pub term: u64,
    pub store: Arc<S>,
    pub context: Arc<NodeContext>,
    /// Boxed: the table's slots stay small, and a run's state does not move when it grows.
    /// Hashed with foldhash (randomly seeded, so still safe against crafted ids): a task
    /// looks its run up several times.
    pub runs: HashMap<RunId, Box<ActiveRun>, foldhash::fast::RandomState>,
    /// Active runs of the store that the last reload could not rebuild (a record that does
    /// not decode, a version whose definition no longer compiles), each with why. They stay
    /// in the store as they are, and every request about one is refused as unavailable, so
    /// that the shard serves its other runs while none of these is started again or changed.
    pub held_back: HashMap<RunId, String>,
    pub timers: TimerWheel,
    /// Definitions already pinned in this shard's store.
    pub pinned: HashSet<(String, u32)>,
    /// Versions of the flows whose catalog lives in this shard, oldest first.
    pub catalog: BTreeMap<String, Vec<CatalogEntry>>,
    /// The flows of the catalog whose schedule and trigger are paused.
    pub flow_pauses: BTreeMap<String, flowgrid_proto::FlowPause>,
    /// The next slot of each flow of the catalog that has a schedule (and is not paused).
    pub schedules: BTreeMap<String, Millis>,
    /// Up to when the schedules' slots were looked at: a version deployed meanwhile arms its
    /// schedule from here, so a slot that fell during its commit is still started.
    pub schedules_checked_ms: Millis,
    /// The triggers of the flows of the catalog whose latest version has one.
    pub triggers: super::triggers::Triggers,
    /// The concurrency limits whose gate is in this shard.
    pub gates: super::gates::Gates,
    /// When the next retention pass is due; `None` without `--retain-ended-runs`.
    pub next_prune_ms: Option<Millis>,
    /// Where in the runs listing the next retention pass goes on; `None`: from its start.
    pub prune_from: Option<flowgrid_store::Key>,
    /// Timers were due but the last batch was over its bytes: the next turn fires one
    /// before it takes more events.
    pub timers_first: bool,
    pub metrics: ShardMetrics,
    /// The actor's own inbox, for tasks it spawned (weak: it does not keep the actor alive).
    pub inbox: mpsc::WeakSender<Command>,
    /// Cancelled when the actor stops: the tasks it spawned stop with it.
    pub stopped: CancellationToken,
    /// A child of `stopped`, cancelled and made anew when the shard reloads: the tasks that
    /// follow from what it loaded (outbox deliveries, child starts, triggers) stop, and the
    /// reload starts them again from the store, so that no copy is left running.
    pub loaded: CancellationToken,
    /// The latest write of each message in the outbox.
    pub outbox_writes: super::outbox::OutboxWrites,
}

/// Takes over an opened shard: bumps its epoch, reloads its runs, and starts its actor.
/// Returns once the shard serves (its active runs reloaded and their open tasks queued
/// for republishing), with the epoch it serves under.
pub async fn spawn_shard<S: ShardStore>(
    shard_store: S,
    shard: ShardId,
    context: Arc<NodeContext>,
    queue_max: usize,
    shutdown: CancellationToken,
) -> Result<(ShardHandle, Epoch, tokio::task::JoinHandle<()>)> {
    let shard_store = Arc::new(shard_store);
    let term = context.lease.term();
    let epoch = shard_store.acquire().await?;
    let results = context
        .nats
        .subscribe(context.subjects.shard_results(shard.0))
        .await
        .map_err(|source| Error::Nats { what: "subscribe", source: Box::new(source) })?;
    let next_prune_ms =
        context.retain_ended_ms.map(|retain_ms| now_ms() + super::retention::prune_interval_ms(retain_ms));
    let (sender, inbox) = mpsc::channel(queue_max);
    let stopped = shutdown.child_token();
    let mut actor = ShardActor {
        shard,
        epoch,
        term,
        store: shard_store,
        context,
        runs: HashMap::default(),
        held_back: HashMap::new(),
        timers: TimerWheel::default(),
        pinned: HashSet::new(),
        catalog: BTreeMap::new(),
        flow_pauses: BTreeMap::new(),
        schedules: BTreeMap::new(),
        triggers: Default::default(),
        gates: Default::default(),
        next_prune_ms,
        prune_from: None,
        timers_first: false,
        schedules_checked_ms: now_ms(),
        metrics: ShardMetrics::register(),
        inbox: sender.downgrade(),
        loaded: stopped.child_token(),
        stopped,
        outbox_writes: Default::default(),
    };
    let reloaded = match actor.reload().await {
        Ok(reloaded) => reloaded,
        Err(error) => {
            // Stops what the reload started already (a flow's trigger), and forgets what it
            // counted and published (its runs, its flows' latest versions): the shard is
            // opened again later, here or elsewhere.
            actor.stopped.cancel();
            actor.forget_all_runs();
            actor.context.plans.forget_latest(actor.catalog.keys());
            return Err(error);
        }
    };
    actor.resume(reloaded).await;
    info!(shard = %shard, epoch = %epoch, runs = actor.runs.len(), "shard acquired");
    let handle = tokio::spawn(actor.run(inbox, results, shutdown));
    Ok((ShardHandle { shard, sender }, epoch, handle))
}

impl<S: ShardStore> ShardActor<S> {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Command>,
        mut results: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        ::metrics::gauge!(metrics::SHARDS_OWNED).increment(1.0);
        let _stop_spawned = self.stopped.clone().drop_guard();
        loop {
            let mut batch = Batch::default();
            let next_due = [self.timers.next_due(), self.next_schedule_due(), self.next_prune_ms, self.next_gate_due()]
                .into_iter()
                .flatten()
                .min();
            let sleep = sleep_until(next_due);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.forget_delivered(&mut inbox).await;
                    break;
                }
                command = inbox.recv() => match command {
                    Some(command) => self.handle(command, &mut batch).await,
                    None => break,
                },
                message = results.next() => match message {
                    Some(message) => self.handle_result_message(message, &mut batch),
                    None => break,
                },
                _ = sleep => {}
            }
            if std::mem::take(&mut self.timers_first) {
                self.fire_due_timers(now_ms(), &mut batch, true);
            }
            self.admit_first_due_gate(&mut batch);
            self.fill_batch(&mut inbox, &mut results, &mut batch).await;
            let now = now_ms();
            self.fire_due_timers(now, &mut batch, false);
            self.admit_due_gates(now, &mut batch);
            self.schedules_checked(now);
            self.prune_if_due(now, &mut batch).await;
            if !self.context.lease.holds(self.term) {
                // Others may take the shard soon: nothing more is committed or sent from here.
                warn!(shard = %self.shard, "lease not renewed in time; the shard stops serving here");
                self.refuse(batch, "its coordinator lost its lease").await;
                break;
            }
            if let Err(error) = self.commit(batch).await {
                match error {
                    flowgrid_store::Error::StaleEpoch { .. } => {
                        warn!(shard = %self.shard, epoch = %self.epoch, error = %error, "shard lost to another owner; stopping it");
                        break;
                    }
                    // A commit that may have been applied, retried by the store, can also have
                    // met another owner's epoch: stop then, as for a stale epoch.
                    flowgrid_store::Error::OutcomeUnknown { .. }
                        if self.store.current_epoch().await.is_ok_and(|current| current != self.epoch) =>
                    {
                        warn!(shard = %self.shard, epoch = %self.epoch, error = %error, "shard lost to another owner after a commit that may have been applied; stopping it");
                        break;
                    }
                    other => {
                        error!(shard = %self.shard, error = %other, "commit failed; reloading the shard from the store");
                        if let Err(reload_error) = self.reset_and_reload().await {
                            error!(shard = %self.shard, error = %reload_error, "reload failed; stopping the shard");
                            break;
                        }
                    }
                }
            }
            self.start_due_schedules(now);
        }
        // The tasks the actor spawned stop before its runs are forgotten: forgetting an open
        // attempt ends the task cache flight it leads, and a lookup of this shard woken by
        // that must not lead a flight here (the next owner sends its task again).
        self.stopped.cancel();
        self.forget_all_runs();
        self.context.plans.forget_latest(self.catalog.keys());
        // Results already received get an answer, so their workers send them again at once
        // (to the next owner) instead of waiting for a timeout.
        let _ = results.unsubscribe().await;
        let unavailable = Reply::<ResultAck>::Error(ApiError::new(
            ErrorCode::Unavailable,
            format!("shard {} is moving to another coordinator; retry", self.shard),
        ));
        while let Some(Some(message)) = results.next().now_or_never() {
            let encoding = crate::api::encoding_of(&message);
            if let Some(reply_to) = message.reply {
                self.send_result_reply(reply_to, encoding, &unavailable).await;
            }
        }
        ::metrics::gauge!(metrics::SHARDS_OWNED).decrement(1.0);
        debug!(shard = %self.shard, "shard actor stopped");
    }

    /// On a graceful stop: deletes the outbox messages whose receivers took them since the
    /// last commit, so that the shard's next owner does not send them again (which would be
    /// harmless, but slower). Other queued commands are dropped, as on any stop: their
    /// callers are told the shard is unavailable and try its next owner.
    async fn forget_delivered(&mut self, inbox: &mut mpsc::Receiver<Command>) {
        let mut batch = Batch::default();
        while let Ok(command) = inbox.try_recv() {
            if let Command::OutboxDelivered { key, write } = command {
                self.delete_delivered(&key, write, &mut batch);
            }
        }
        if batch.writes.is_empty() || !self.context.lease.holds(self.term) {
            return;
        }
        if let Err(error) = self.commit(batch).await {
            debug!(shard = %self.shard, error = %error, "delivered outbox messages not deleted at the stop; the next owner sends them again");
        }
    }

    /// Answers every caller of a batch that will not be committed.
    async fn refuse(&self, batch: Batch, why: &str) {
        let failure =
            ApiError::new(ErrorCode::Unavailable, format!("shard {} is not served here ({why}); retry", self.shard));
        let Batch { replies, result_replies, refused_results, .. } = batch;
        self.answer_refused(refused_results).await;
        self.fail(replies, result_replies, &failure).await;
    }

    /// Answers the results a batch refused on their face.
    async fn answer_refused(&self, refused: Vec<RefusedResult>) {
        for RefusedResult { reply_to, encoding, refusal } in refused {
            self.send_result_reply(reply_to, encoding, &Reply::Error(refusal)).await;
        }
    }

    /// Answers callers with `failure`; workers always get a retryable refusal, since
    /// their result was not recorded.
    async fn fail(&self, replies: Vec<DeferredReply>, result_replies: Vec<ResultReply>, failure: &ApiError) {
        for reply in replies {
            reply(Some(failure));
        }
        let unavailable = Reply::<ResultAck>::Error(ApiError::new(ErrorCode::Unavailable, failure.message.clone()));
        for ResultReply { reply_to, encoding, .. } in result_replies {
            self.send_result_reply(reply_to, encoding, &unavailable).await;
        }
    }

    /// Drops every run from memory, lowering the gauges they raised.
    fn forget_all_runs(&mut self) {
        let runs = self.runs.len() as u64;
        for active in self.runs.values() {
            for (timer, _) in active.run.armed_timers() {
                if let TimerKey::AttemptTimeout { attempt } = timer {
                    attempt_closed(&mut self.metrics, active.run.plan(), &attempt);
                    self.context.task_cache.flights().leader_gone(&attempt);
                }
            }
        }
        self.runs.clear();
        self.context.active_runs.fetch_sub(runs, Ordering::Relaxed);
        self.metrics.runs_active.decrement(runs as f64);
        self.metrics.runs_held_back.decrement(self.held_back.len() as f64);
        self.held_back.clear();
    }

    /// Takes whatever else is ready right now, up to the batch bound, without waiting; stops
    /// early once the batch holds a quarter of a commit's bytes, so that the next event
    /// (a payload, a run's end) still fits in the commit.
    async fn fill_batch(
        &mut self,
        inbox: &mut mpsc::Receiver<Command>,
        results: &mut async_nats::Subscriber,
        batch: &mut Batch,
    ) {
        let commands_max = self.context.batch_events_max;
        let bytes_max = self.batch_bytes_max();
        while batch.commands < commands_max && batch.writes.bytes() < bytes_max {
            let mut progressed = false;
            if let Ok(command) = inbox.try_recv() {
                self.handle(command, batch).await;
                progressed = true;
            }
            if let Some(Some(message)) = results.next().now_or_never() {
                self.handle_result_message(message, batch);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
    }

    /// The store writes past which a batch takes nothing more: a share of what one commit
    /// may hold, so that the effects of what it took (a run's snapshot, outbox messages)
    /// still fit.
    pub(super) fn batch_bytes_max(&self) -> usize {
        self.context.store_limits.transaction_bytes_max / BATCH_BYTES_SHARE
    }

    async fn handle(&mut self, command: Command, batch: &mut Batch) {
        batch.commands += 1;
        match command {
            Command::Start { start, reply } => {
                let outcome = self.start_run(start, batch).await;
                batch.reply(reply, outcome);
            }
            Command::Cancel { run_id, reason, reply } => {
                let outcome = self.cancel_run(run_id, reason, batch).await;
                batch.reply(reply, outcome);
            }
            Command::Redrive { request, reply } => self.redrive_run(request, reply, batch).await,
            Command::RedriveReplayed { request, replayed, reply } => {
                let outcome = self.take_replayed(request, *replayed.0, batch).await;
                batch.reply(reply, outcome);
            }
            Command::Pause { request, pause, reply } => {
                let outcome = self.pause_run(request, pause, batch).await;
                batch.reply(reply, outcome);
            }
            Command::Signal { request, reply } => {
                let answer = self.signal_run(request, batch).await;
                batch.answer(reply, answer);
            }
            Command::Get { run_id, reply } => {
                let answer = self.get_run(run_id).await;
                batch.answer(reply, answer);
            }
            Command::History { run_id, after, limit, reply } => self.read_history(run_id, after, limit, reply),
            Command::List { query, limit, reply } => {
                let outcome = self.list_runs(&query, limit).await;
                batch.reply(reply, outcome);
            }
            Command::Deploy { definition, reply } => {
                let outcome = self.deploy(*definition, batch);
                batch.reply(reply, outcome);
            }
            Command::PauseFlow { request, pause, reply } => {
                let outcome = self.pause_flow(request, pause, batch);
                batch.reply(reply, outcome);
            }
            Command::Plan { name, version, reply } => {
                let outcome = self.plan(&name, version);
                batch.reply(reply, outcome);
            }
            Command::GetFlow { name, version, reply } => {
                let outcome = self.flow_info(&name, version);
                batch.reply(reply, outcome);
            }
            Command::ListFlows { after, limit, bytes_unbounded, reply } => {
                let outcome = Ok(self.flows_page(after.as_deref(), limit, bytes_unbounded));
                batch.reply(reply, outcome);
            }
            Command::ChildEnded { ended, reply } => {
                let outcome = self.take_child_end(ended, batch).await;
                batch.reply(reply, outcome);
            }
            Command::Gate { verb, message, reply } => {
                let outcome = self.take_gate_message(verb, message, batch);
                batch.reply(reply, outcome);
            }
            Command::Limits { flow, reply } => {
                let outcome = Ok(self.limit_summaries(flow.as_deref()));
                batch.reply(reply, outcome);
            }
            Command::OutboxDelivered { key, write } => self.delete_delivered(&key, write, batch),
            Command::CachedResult { attempt, output } => self.take_cached_result(attempt, output, batch),
        }
    }

    /// Fires the timers due by `now`: at least one a turn while the batch is within its
    /// bytes, then as many as the batch has room for, in events and in bytes. A timer that
    /// ends a run writes its snapshot: a thousand of them due at once (overdue after a
    /// takeover) did not fit one commit, whose failure reloaded the shard to fire the same
    /// timers again, for good. A batch already over its bytes (its last event a large run's
    /// end) takes none: the next turn fires the first one before it takes more events
    /// (`only_first`: that one alone, so that a backlog of timers does not keep requests
    /// and results out of the turns), so that timers go on under any load.
    fn fire_due_timers(&mut self, now: Millis, batch: &mut Batch, only_first: bool) {
        let bytes_max = self.batch_bytes_max();
        let mut first = batch.writes.bytes() < bytes_max;
        if !first && self.timers.next_due().is_some_and(|due_ms| due_ms <= now) {
            self.timers_first = true;
        }
        while first
            || (!only_first && batch.commands < self.context.batch_events_max && batch.writes.bytes() < bytes_max)
        {
            let Some((run_id, timer)) = self.timers.pop_due(now) else { break };
            first = false;
            ::metrics::counter!(metrics::TIMERS_FIRED).increment(1);
            batch.commands += 1;
            let start_due = timer == TimerKey::StartDue;
            let applied = self.apply_event(&run_id, flowgrid_engine::Event::TimerFired { timer }, now, batch);
            // A delayed run of a limited flow is queued at its start time: it asks for its slot.
            if let Some(active) = self.runs.get(&run_id).filter(|active| applied && start_due && active.run.is_queued())
            {
                self.ask_for_slot(&active.run, None, batch);
            }
        }
    }

    /// Commits the batch, then publishes, replies and acks. Nothing of the batch is visible
    /// outside before the commit returns.
    async fn commit(&mut self, batch: Batch) -> std::result::Result<(), flowgrid_store::Error> {
        let Batch {
            writes,
            commands,
            dispatches,
            replies,
            result_replies,
            refused_results,
            finished,
            deployed,
            child_starts,
            outbox,
            mut cancelled,
            cache_stores,
            signals: _,
        } = batch;
        let dispatches = drop_closed(dispatches, &mut cancelled);
        self.answer_refused(refused_results).await;
        if !writes.is_empty() {
            let started = Instant::now();
            let committed = self.store.commit(self.epoch, writes).await;
            self.metrics.commit_seconds.record(started.elapsed().as_secs_f64());
            self.metrics.commit_batch_events.record(commands as f64);
            if let Err(error) = committed {
                ::metrics::counter!(metrics::COMMIT_FAILED).increment(1);
                let failure = commit_failure(self.shard, &error);
                self.fail(replies, result_replies, &failure).await;
                return Err(error);
            }
        }
        self.forget_finished(finished);
        for plan in deployed {
            self.arm_deployed_schedule(&plan);
            self.update_trigger(&plan);
            self.context.plans.insert(Arc::clone(&plan));
            self.context.plans.set_latest(plan);
        }
        for Dispatch { task, result_taken } in dispatches {
            self.dispatch(task, result_taken).await;
        }
        if !cache_stores.is_empty() {
            self.store_in_cache(cache_stores);
        }
        if !cancelled.is_empty() {
            self.tell_cancelled(cancelled).await;
        }
        for reply in replies {
            reply(None);
        }
        for ResultReply { reply_to, encoding, applied } in result_replies {
            self.send_result_reply(reply_to, encoding, &Reply::Ok(ResultAck { applied })).await;
        }
        for (start, depth) in child_starts {
            self.start_child(start, depth);
        }
        for message in outbox {
            self.deliver(message);
        }
        Ok(())
    }

    /// Tells each pool's workers which of its tasks they may stop (a notice per pool, of up
    /// to [`CANCELLED_PER_NOTICE_MAX`] tasks). Best effort: a worker that misses it
    /// finishes the task, whose result is ignored.
    async fn tell_cancelled(&self, cancelled: Vec<(Arc<str>, AttemptId)>) {
        let mut by_pool: BTreeMap<Arc<str>, Vec<AttemptId>> = BTreeMap::new();
        for (pool, attempt) in cancelled {
            by_pool.entry(pool).or_default().push(attempt);
        }
        for (pool, mut attempts) in by_pool {
            while !attempts.is_empty() {
                let rest = attempts.split_off(attempts.len().min(CANCELLED_PER_NOTICE_MAX));
                let notice = TasksCancelled { attempts: std::mem::replace(&mut attempts, rest) };
                self.publish_cancelled(&pool, &notice).await;
            }
        }
    }

    /// Publishes one notice of cancelled tasks to `pool`'s workers.
    async fn publish_cancelled(&self, pool: &Arc<str>, notice: &TasksCancelled) {
        let Ok(payload) = flowgrid_proto::encode(Encoding::Json, notice) else { return };
        let headers = crate::api::content_headers(Encoding::Json);
        let subject = self.context.subjects.cancels(pool);
        match self.context.nats.publish_with_headers(subject, headers, Bytes::from(payload)).await {
            Ok(()) => {
                let count = notice.attempts.len() as u64;
                ::metrics::counter!(metrics::TASKS_CANCELLED, "pool" => Arc::clone(pool)).increment(count)
            }
            Err(error) => {
                debug!(shard = %self.shard, pool = %pool, error = %error, "cannot tell workers of tasks cancelled")
            }
        }
    }

    async fn send_result_reply(&self, reply_to: async_nats::Subject, encoding: Encoding, reply: &Reply<ResultAck>) {
        let Ok(payload) = flowgrid_proto::encode(encoding, reply) else { return };
        let headers = crate::api::content_headers(encoding);
        if let Err(error) = self.context.nats.publish_with_headers(reply_to, headers, Bytes::from(payload)).await {
            debug!(shard = %self.shard, error = %error, "cannot answer a result; the worker will send it again");
        }
    }

    fn forget_finished(&mut self, finished: Vec<RunId>) {
        for run_id in finished {
            if self.runs.remove(&run_id).is_some() {
                // Its timers left the wheel, and its attempts the in-flight gauge, with the
                // `CancelTimer`s of its end.
                self.context.active_runs.fetch_sub(1, Ordering::Relaxed);
                self.metrics.runs_active.decrement(1.0);
            }
        }
    }

    /// Drops the in-memory state and rebuilds it from the store, after a failed commit
    /// left memory ahead of the store.
    async fn reset_and_reload(&mut self) -> Result<()> {
        // First, as at a stop: a task cache lookup of this shard woken by the end of a flight
        // `forget_all_runs` ends must not lead it. The reload sends the task already with a
        // worker first, so that it leads again and the others wait for it again.
        self.loaded.cancel();
        self.loaded = self.stopped.child_token();
        self.forget_all_runs();
        self.timers.clear();
        self.pinned.clear();
        self.context.plans.forget_latest(self.catalog.keys());
        self.catalog.clear();
        self.flow_pauses.clear();
        // Kept for after the reload: the slots that fell meanwhile still start.
        let armed = std::mem::take(&mut self.schedules);
        self.gates = Default::default();
        self.triggers = Default::default();
        // The failure may be transient (disk full cleared, cluster back): pause before reading.
        tokio::time::sleep(RELOAD_PAUSE).await;
        let reloaded = self.reload().await?;
        self.keep_armed_slots(armed);
        self.resume(reloaded).await;
        info!(shard = %self.shard, runs = self.runs.len(), "shard reloaded");
        Ok(())
    }
}

/// The dispatches of a batch, but for the attempts that the same batch closed (in
/// `cancelled`): a map item dispatched as its run failed at a later item, a step started by
/// a result batched with its run's cancel. Such an attempt is not published (its result
/// would be ignored), and does not lead a task cache flight: its close came before its
/// lookup, so nothing would end that flight, and later tasks of its key would wait for it
/// until its deadline. It leaves `cancelled` too: no worker has it to stop.
fn drop_closed(dispatches: Vec<Dispatch>, cancelled: &mut Vec<(Arc<str>, AttemptId)>) -> Vec<Dispatch> {
    if dispatches.is_empty() || cancelled.is_empty() {
        return dispatches;
    }
    let closed: HashSet<&AttemptId> = cancelled.iter().map(|(_, attempt)| attempt).collect();
    let (open, unsent): (Vec<Dispatch>, Vec<Dispatch>) =
        dispatches.into_iter().partition(|dispatch| !closed.contains(&dispatch.task.attempt));
    if !unsent.is_empty() {
        let unsent: HashSet<AttemptId> = unsent.into_iter().map(|dispatch| dispatch.task.attempt).collect();
        cancelled.retain(|(_, attempt)| !unsent.contains(attempt));
    }
    open
}

/// What the callers of a batch whose commit failed are told.
fn commit_failure(shard: ShardId, error: &flowgrid_store::Error) -> ApiError {
    match error {
        flowgrid_store::Error::StaleEpoch { .. } => {
            ApiError::new(ErrorCode::Unavailable, format!("shard {shard} moved to another coordinator; retry"))
        }
        flowgrid_store::Error::OutcomeUnknown { .. } => {
            super::maybe_applied(format!("store commit of shard {shard} failed ({error})"))
        }
        // Nothing was committed and the shard reloads: the same request may pass later.
        transient if transient.may_pass_later() => {
            ApiError::new(ErrorCode::Unavailable, format!("store commit failed, nothing was changed: {error}; retry"))
        }
        other => ApiError::new(ErrorCode::Internal, format!("store commit failed: {other}")),
    }
}

/// Sleeps until `due` (Unix ms), at most [`SLEEP_MAX`] (a clock set back meanwhile would
/// otherwise hold a timer for as long), or forever when there is no timer.
async fn sleep_until(due: Option<Millis>) {
    match due {
        Some(due) => {
            let wait = Duration::from_millis(due.saturating_sub(now_ms())).min(SLEEP_MAX);
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notice of cancelled tasks with the longest attempt ids fits the NATS server's
    /// default `max_payload` (1 MiB) with room for its subject and headers.
    #[test]
    fn a_notice_of_cancelled_tasks_fits_a_default_payload() {
        let attempt = AttemptId {
            run_id: RunId::from_idempotency_key("f", "k"),
            step: "s".repeat(flowgrid_model::limits::Limits::default().name_bytes_max),
            item: Some(u32::MAX),
            attempt: u32::MAX,
        };
        let notice = TasksCancelled { attempts: vec![attempt; CANCELLED_PER_NOTICE_MAX] };
        let bytes = flowgrid_proto::encode(Encoding::Json, &notice).expect("encodes").len();
        assert!(bytes <= 1024 * 1024 - 64 * 1024, "{bytes} bytes");
    }

    #[test]
    fn a_failed_commit_is_retryable_unless_the_batch_or_the_data_is_at_fault() {
        let shard = ShardId(7);
        let io = flowgrid_store::Error::Backend(Box::new(std::io::Error::other("No space left on device")));
        let refusal = commit_failure(shard, &io);
        assert_eq!(refusal.code, ErrorCode::Unavailable);
        assert!(refusal.retryable && refusal.message.contains("No space left"), "{refusal:?}");
        let stale = flowgrid_store::Error::StaleEpoch { shard, epoch: Epoch(1), current: Epoch(2) };
        assert!(commit_failure(shard, &stale).retryable);
        let too_large = flowgrid_store::Error::TooLarge { what: "a value", size: 200_000, limit: 100_000 };
        let refusal = commit_failure(shard, &too_large);
        assert_eq!(refusal.code, ErrorCode::Internal);
        assert!(!refusal.retryable, "{refusal:?}");
        // Maybe applied: repeated by the SDK only where that is safe.
        let unknown = flowgrid_store::Error::OutcomeUnknown { detail: "transaction timed out".into() };
        let refusal = commit_failure(shard, &unknown);
        assert_eq!(refusal.code, ErrorCode::Unavailable);
        assert!(!refusal.retryable && refusal.message.contains("may have been applied"), "{refusal:?}");
    }
}
