//! Run commands of a shard actor: start, results, timers, cancel, get, list.
//!
//! Every accepted engine event is appended to the run's history in the batch; the
//! effects the engine asked for are queued on the batch and carried out after the commit.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use flowgrid_engine::{
    Applied, Effect, Event, RedriveRefused, Redriven, Run, RunStart, RunStatus, RunView, SignalRefused, TaskDispatch,
    TaskError, TimerKey,
};
use flowgrid_model::limits::{
    json_bytes, nesting_depth, ErrorCodeProblem, Limits, PAUSES_MAX, PROGRESS_BYTES_MAX, SUBFLOW_DEPTH_MAX,
};
use flowgrid_model::{has_labels, AttemptId, FlowPlan, Labels, Millis, PlanStepKind, RunId};
use flowgrid_proto::{
    ApiError, ChildEndTaken, ChildRunEnded, Encoding, ErrorCode, ListRuns, PauseRun, RedriveRun, RunCancelled,
    RunEnded, RunPaused, RunRedriven, RunSignalled, RunStarted, RunSummary, SignalRun, TaskResult,
};
use flowgrid_store::{keys, ShardStore};
use serde_json::Value;
use tracing::{debug, warn};

use super::actor::{ActiveRun, ShardActor};
use super::batch::{Answer, Batch, Dispatch, RefusedResult, ResultReply};
use super::history::PAGE_RECORDS_MAX;
use super::{Command, Replayed, Responder, RunsPage, StartCommand};
use crate::clock::now_ms;
use crate::error::cut;
use crate::metrics::{self, ShardMetrics, TaskMetrics};
use crate::records::{self, EventRecord, OutboxRecord, RunRecord, StartRecord};

/// Index entries one list request may read per shard, matching or not: bounds the work of
/// a filter that matches few runs.
const LIST_SCAN_ENTRIES_MAX: usize = 10_000;

impl<S: ShardStore> ShardActor<S> {
    pub(super) async fn start_run(&mut self, start: StartCommand, batch: &mut Batch) -> Result<RunStarted, ApiError> {
        let StartCommand { run_id, plan, input, idempotent, parent, labels, start_at } = start;
        if let Some(active) = self.runs.get(&run_id) {
            let plan = active.run.plan();
            return Ok(RunStarted { run_id, flow: plan.name.clone(), version: plan.version, created: false });
        }
        if idempotent {
            if let Some(record) = self.run_record(&run_id).await? {
                return Ok(RunStarted { run_id, flow: record.flow, version: record.version, created: false });
            }
        }
        self.check_room(parent.as_ref().map_or(0, |parent| parent.depth))?;
        let context = &self.context;
        // A run of a flow with a concurrency limit starts queued, under its key.
        let gate_key = match &plan.concurrency {
            Some(concurrency) => Some(
                concurrency
                    .key_of(context.plans.evaluator(), &input)
                    .map_err(|message| ApiError::new(ErrorCode::InvalidRequest, message))?,
            ),
            None => None,
        };
        let now = now_ms();
        // A delayed run asks for its slot at its start time (see `fire_due_timers`).
        let start_at = start_at.filter(|start_at| *start_at > now);
        let queued = gate_key.is_some() && start_at.is_none();
        let pin = (plan.name.clone(), plan.version);
        if !self.pinned.contains(&pin) {
            let definition = records::encode(&plan.definition);
            batch.writes.set_chunked(&keys::pinned_definition(&pin.0, pin.1), &definition, &context.store_limits);
            self.pinned.insert(pin);
        }
        let start_record = StartRecord {
            flow: Cow::Borrowed(&plan.name),
            version: plan.version,
            input: Cow::Borrowed(&input),
            now_ms: now,
            epoch: self.epoch.0,
            parent: parent.as_ref().map(Cow::Borrowed),
            labels: (!labels.is_empty()).then_some(Cow::Borrowed(&labels)),
            queued,
            start_at_ms: start_at,
        };
        // A new run: its history starts here. Its run record and listing entry are written
        // when it ends; until then the shard answers for it from memory (ADR 0009).
        batch.writes.insert_chunked(&keys::history(&run_id, 0), &records::encode(&start_record), &context.store_limits);
        batch.writes.set(keys::active(&run_id), Vec::new());

        let mut effects = Vec::new();
        let evaluator = context.plans.evaluator().clone();
        let start = RunStart { run_id: run_id.clone(), input, labels, now, queued, start_at };
        let mut run = Run::start(plan.clone(), &evaluator, start, &mut effects);
        if queued {
            self.ask_for_slot(&run, gate_key, batch);
        }
        if let Some(parent) = parent {
            run.set_parent(parent);
        }
        let active = ActiveRun { run, next_seq: 1 };
        self.runs.insert(run_id.clone(), Box::new(active));
        self.context.active_runs.fetch_add(1, Ordering::Relaxed);
        self.metrics.runs_active.increment(1.0);
        self.metrics.runs_started.increment(1);
        self.carry_out(&run_id, effects, None, now, batch);
        Ok(RunStarted { run_id, flow: plan.name.clone(), version: plan.version, created: true })
    }

    /// Refuses one more active run when the coordinator holds as many as it may. `depth` is
    /// the run's depth as a child run (0 for a run no subflow step starts): a child may go
    /// past the bound into the headroom its depth keeps (see [`active_runs_allowed`]).
    fn check_room(&self, depth: u32) -> Result<(), ApiError> {
        let context = &self.context;
        let allowed = active_runs_allowed(context.active_runs_max, depth);
        if context.active_runs.load(Ordering::Relaxed) < allowed {
            return Ok(());
        }
        let what = match depth {
            0 => format!("{} runs are active, the most this coordinator holds", context.active_runs_max),
            depth => format!(
                "{allowed} runs are active, the most this coordinator holds with the headroom it keeps for child \
                 runs {depth} deep"
            ),
        };
        Err(crate::api::overloaded(format!("{what}; retry later")))
    }

    /// A worker's result, as received on the shard's result subject.
    pub(super) fn handle_result_message(&mut self, message: async_nats::Message, batch: &mut Batch) {
        let taken = Instant::now();
        batch.commands += 1;
        let encoding = crate::api::encoding_of(&message);
        let Some(reply_to) = message.reply.clone() else {
            debug!(shard = %self.shard, "result without a reply subject ignored; send results as requests");
            return;
        };
        let mut result: TaskResult = match flowgrid_proto::decode(encoding, &message.payload) {
            Ok(result) => result,
            Err(error) => {
                warn!(shard = %self.shard, error = %error, "malformed task result");
                let reply = ApiError::new(ErrorCode::InvalidRequest, error.to_string());
                batch.refused_results.push(RefusedResult { reply_to, encoding, refusal: reply });
                return;
            }
        };
        let run_id = result.attempt.run_id.clone();
        let limits = self.context.plans.limits();
        let event = match (result.take_output(), result.error, result.progress) {
            (Some(output), None, None) => match too_deep("output", &output, limits) {
                None => Event::TaskSucceeded { attempt: result.attempt, output },
                Some(problem) => Event::TaskFailed { attempt: result.attempt, error: invalid_output(problem) },
            },
            (None, Some(error), None) => match error_problem(&error, limits) {
                None => Event::TaskFailed { attempt: result.attempt, error },
                Some(problem) => Event::TaskFailed { attempt: result.attempt, error: invalid_output(problem) },
            },
            (None, None, Some(_)) if message.payload.len() > PROGRESS_BYTES_MAX => {
                let why = format!(
                    "the progress report is {} bytes, over the limit of {PROGRESS_BYTES_MAX}: report how far the \
                     attempt got (a count, a stage, a cursor), not the data itself",
                    message.payload.len()
                );
                let refusal = ApiError::new(ErrorCode::PayloadTooLarge, why);
                batch.refused_results.push(RefusedResult { reply_to, encoding, refusal });
                return;
            }
            (None, None, Some(details)) => match too_deep("progress report", &details, limits) {
                None => Event::TaskProgress { attempt: result.attempt, details },
                Some(problem) => {
                    let refusal = ApiError::new(ErrorCode::InvalidRequest, problem);
                    batch.refused_results.push(RefusedResult { reply_to, encoding, refusal });
                    return;
                }
            },
            _ => {
                let reply = ApiError::new(
                    ErrorCode::InvalidRequest,
                    "a task result needs exactly one of `output`, `error` and `progress` (spelt so: other fields \
                     are not read; an `output` of null counts only without the other two)",
                );
                batch.refused_results.push(RefusedResult { reply_to, encoding, refusal: reply });
                return;
            }
        };
        if let Some(refusal) = self.held_back_refusal(&run_id) {
            batch.refused_results.push(RefusedResult { reply_to, encoding, refusal });
            return;
        }
        let payload_max = limits.payload_bytes_max;
        if message.payload.len() > payload_max {
            let reply = ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the result is {} bytes, over the limit of {payload_max}; return a reference to large data instead",
                    message.payload.len()
                ),
            );
            batch.refused_results.push(RefusedResult { reply_to, encoding, refusal: reply });
            return;
        }
        let dispatched_before = batch.dispatches.len();
        let applied = self.apply_event(&run_id, event, now_ms(), batch);
        for dispatch in &mut batch.dispatches[dispatched_before..] {
            dispatch.result_taken = Some(taken);
        }
        batch.result_replies.push(ResultReply { reply_to, encoding, applied });
    }

    /// Applies one event to an active run; returns whether it was accepted.
    pub(super) fn apply_event(&mut self, run_id: &RunId, event: Event, now: Millis, batch: &mut Batch) -> bool {
        let Some(active) = self.runs.get_mut(run_id) else {
            debug!(run = %run_id, "event for a run that is not active ignored");
            return false;
        };
        let mut effects = Vec::new();
        let evaluator = self.context.plans.evaluator().clone();
        match active.run.apply(&evaluator, now, &event, &mut effects) {
            Applied::Ignored(reason) => {
                debug!(run = %run_id, reason, "event ignored");
                false
            }
            Applied::Accepted => {
                count_result(&mut self.metrics, active.run.plan(), &event);
                if let Event::TaskFailed { attempt, .. }
                | Event::TimerFired { timer: TimerKey::AttemptTimeout { attempt } } = &event
                {
                    self.context.task_cache.flights().leader_gone(attempt);
                }
                let key = keys::history(run_id, active.next_seq);
                active.next_seq += 1;
                let resulted = match &event {
                    Event::TaskSucceeded { attempt, .. }
                    | Event::TaskCached { attempt, .. }
                    | Event::TaskFailed { attempt, .. } => Some(attempt),
                    _ => None,
                };
                self.carry_out(run_id, effects, resulted, now, batch);
                let record = EventRecord { now_ms: now, event, epoch: self.epoch.0 };
                // `next_seq` is past every record of the history (reload counts them).
                batch.writes.insert_chunked(&key, &records::encode(&record), &self.context.store_limits);
                true
            }
        }
    }

    /// Queues the engine's effects: tasks to publish after the commit, timers, run end.
    /// `resulted`: the attempt whose result the effects follow from, if any; every other
    /// attempt they close is still out with a worker, which is told to stop.
    fn carry_out(
        &mut self,
        run_id: &RunId,
        effects: Vec<Effect>,
        resulted: Option<&AttemptId>,
        now: Millis,
        batch: &mut Batch,
    ) {
        for effect in effects {
            match effect {
                Effect::Dispatch(task) => {
                    attempt_opened(&mut self.metrics, &task);
                    batch.dispatches.push(Dispatch { task, result_taken: None });
                }
                Effect::ArmTimer { run_id, timer, due_ms } => self.timers.arm(run_id, timer, due_ms),
                Effect::CancelTimer { run_id, timer, due_ms } => {
                    if let (TimerKey::AttemptTimeout { attempt }, Some(active)) = (&timer, self.runs.get(&run_id)) {
                        let pool = attempt_closed(&mut self.metrics, active.run.plan(), attempt);
                        if let Some(pool) = pool.filter(|_| resulted != Some(attempt)) {
                            batch.cancelled.push((pool.clone(), attempt.clone()));
                            self.context.task_cache.flights().leader_gone(attempt);
                        }
                    }
                    self.timers.cancel(run_id, timer, due_ms);
                }
                Effect::StartChild(start) => {
                    let depth = self.runs.get(run_id).map_or(1, |active| super::outbox::child_depth(&active.run));
                    batch.child_starts.push((start, depth));
                }
                Effect::CancelChild { child, reason } => {
                    self.send_after_commit(OutboxRecord::CancelChild { child, reason }, batch)
                }
                Effect::CacheResult { pool, task, key, output } => {
                    batch.cache_stores.push(super::batch::CacheStore { pool, task, key, output })
                }
                Effect::StartFailureHandler(handler) => {
                    let start = flowgrid_proto::StartRun {
                        flow: handler.flow,
                        input: handler.input,
                        idempotency_key: Some(handler.idempotency_key),
                        labels: handler.labels,
                        ..Default::default()
                    };
                    let record =
                        OutboxRecord::StartFailureHandler { failed: handler.failed, round: handler.round, start };
                    self.send_after_commit(record, batch);
                }
                Effect::RunFinished { run_id: finished, status } => self.finish_run(&finished, status, now, batch),
            }
        }
        debug_assert!(self.runs.contains_key(run_id), "effects belong to an active run");
    }

    fn finish_run(&mut self, run_id: &RunId, status: RunStatus, now: Millis, batch: &mut Batch) {
        let Some(active) = self.runs.get(run_id) else { return };
        let plan = active.run.plan();
        let created_ms = active.run.created_ms();
        // A run ends once, and only then gets a snapshot, unless its data (input, outputs)
        // would take too much of the commit: then reads rebuild its view from its history.
        let snapshot = records::encode(&active.run.view_ref());
        let view_in_history = snapshot.len() > self.context.store_limits.transaction_bytes_max / SNAPSHOT_SHARE_MAX;
        if view_in_history {
            debug!(run = %run_id, bytes = snapshot.len(), "final view too large for a snapshot; kept in its history");
        } else {
            batch.writes.insert_chunked(&keys::snapshot(run_id), &snapshot, &self.context.store_limits);
        }
        let ended_ms = Some(now);
        let record =
            RunRecord { flow: plan.name.clone(), version: plan.version, status, created_ms, ended_ms, view_in_history };
        batch.writes.set(keys::run(run_id), records::encode(&record));
        batch.writes.clear(keys::active(run_id));
        let parent = active.run.parent().map(|parent| parent.run_id.clone());
        let labels = active.run.labels().cloned().unwrap_or_default();
        let entry = summary(run_id, &record, parent, labels);
        batch.writes.set(keys::created(created_ms, run_id), records::encode(&entry));
        // What a parent or the run-ends stream is told: an output over the payload limit
        // (whose view is over it too) is told as an error, so that no message or commit
        // carries more than a payload.
        let payload_max = self.context.plans.limits().payload_bytes_max;
        let output_over = active
            .run
            .output()
            .filter(|_| snapshot.len() > payload_max)
            .map(|output| records::encode(output).len())
            .filter(|&bytes| bytes > payload_max);
        let (output, error) = match output_over {
            Some(bytes) => {
                let message = format!(
                    "its output is {bytes} bytes, over the limit of {payload_max} a run passes on: give the flow an \
                     `output` expression that picks what its caller needs, or pass large data by reference"
                );
                (None, Some(TaskError { code: PAYLOAD_TOO_LARGE.to_owned(), message, retryable: false }))
            }
            None => (active.run.output().cloned(), active.run.error().cloned()),
        };
        if plan.definition.publish_ended {
            let announced = RunEnded {
                run_id: run_id.clone(),
                flow: plan.name.clone(),
                version: plan.version,
                status,
                created_ms,
                ended_ms: now,
                output: output.clone(),
                error: error.clone(),
                redriven: active.run.redriven().map_or(0, |redriven| redriven.times),
            };
            let ended = announcement_within(announced, payload_max);
            self.send_after_commit(OutboxRecord::RunEnded(ended), batch);
        }
        self.give_slot_back(&active.run, batch);
        if let Some(parent) = active.run.parent() {
            // A child that succeeded with an output that cannot be passed on (its error
            // says so) fails its parent's step.
            let ended = ChildRunEnded {
                parent: parent.run_id.clone(),
                step: parent.step.clone(),
                item: parent.item,
                child: run_id.clone(),
                status,
                output,
                error,
                refused: false,
            };
            let bytes_max = payload_max + CHILD_END_FIELDS_BYTES;
            let output_over = |bytes| {
                format!(
                    "its end is {bytes} bytes, over the limit of {bytes_max} a run passes on to its parent: give the \
                     flow an `output` expression that picks what its caller needs, or pass large data by reference"
                )
            };
            let ended = child_end_within(ended, bytes_max, output_over);
            self.send_after_commit(OutboxRecord::ChildEnded(ended), batch);
        }
        batch.finished.push(run_id.clone());
        let seconds = run_seconds(created_ms, active.run.redriven(), now);
        self.metrics.run_finished(&plan.name, status, seconds);
    }

    /// The end of a child run of one of this shard's runs: the parent's subflow step takes
    /// it if it waits for that child. A parent that ended answers `applied: false`.
    pub(super) async fn take_child_end(
        &mut self,
        ended: ChildRunEnded,
        batch: &mut Batch,
    ) -> Result<ChildEndTaken, ApiError> {
        let ChildRunEnded { parent, step, item, child, status, output, error, refused } = ended;
        if !self.runs.contains_key(&parent) {
            self.ended_run(&parent).await?;
            return Ok(ChildEndTaken { applied: false });
        }
        // A refusal keeps its round, when it is applied and whenever its history is replayed
        // (one recorded before the flag gave its round back).
        let event = Event::ChildEnded { step, item, child, status, output, error, refused, keeps_round: refused };
        let applied = self.apply_event(&parent, event, now_ms(), batch);
        Ok(ChildEndTaken { applied })
    }

    pub(super) async fn cancel_run(
        &mut self,
        run_id: RunId,
        reason: String,
        batch: &mut Batch,
    ) -> Result<RunCancelled, ApiError> {
        if self.runs.contains_key(&run_id) {
            let reason = if reason.is_empty() { "cancelled through the API".to_owned() } else { reason };
            let applied = self.apply_event(&run_id, Event::CancelRequested { reason }, now_ms(), batch);
            let status = self.runs.get(&run_id).map(|active| active.run.status()).unwrap_or(RunStatus::Cancelled);
            return Ok(RunCancelled { run_id, status, applied });
        }
        let status = self.ended_run(&run_id).await?.status;
        Ok(RunCancelled { run_id, status, applied: false })
    }

    /// Redrives a run that ended (from the steps named in the request, if any): checks that
    /// it may be, then rebuilds it from its history beside the actor (a long history does
    /// not hold the shard's other runs while it is read) and takes the rebuilt run back with
    /// [`Command::RedriveReplayed`](super::Command::RedriveReplayed). The answer comes from there.
    pub(super) async fn redrive_run(&mut self, request: RedriveRun, reply: Responder<RunRedriven>, batch: &mut Batch) {
        let record = match self.redrivable(&request).await {
            Ok(record) => record,
            Err(refusal) => return batch.reply(reply, Err(refusal)),
        };
        let run_id = request.run_id.clone();
        let plan = match self.pinned_plan(&record.flow, record.version).await {
            Ok(plan) => plan,
            Err(error) => return batch.reply(reply, Err(history_unreadable(&run_id, &error))),
        };
        let (store, evaluator, inbox) =
            (Arc::clone(&self.store), Arc::clone(self.context.plans.evaluator()), self.inbox.clone());
        tokio::spawn(async move {
            let replayed = super::reload::rebuild_ended(&*store, &run_id, &record, plan, &evaluator)
                .await
                .map(|active| (active, record))
                .map_err(|error| history_unreadable(&run_id, &error));
            // A stopped actor drops the reply: its caller is told to retry.
            if let Some(inbox) = inbox.upgrade() {
                let _ = inbox
                    .send(Command::RedriveReplayed { request, replayed: Replayed(Box::new(replayed)), reply })
                    .await;
            }
        });
    }

    /// Applies a redrive whose run was rebuilt from its history: the run's record and
    /// its outbox are checked again (the run may have been redriven, or its history
    /// deleted, meanwhile), then the run is kept in memory again. Its run record, listing
    /// entry and snapshot go in the same commit (an active run has none, ADR 0009) and come
    /// back when it ends again.
    pub(super) async fn take_replayed(
        &mut self,
        request: RedriveRun,
        replayed: Result<(ActiveRun, RunRecord), ApiError>,
        batch: &mut Batch,
    ) -> Result<RunRedriven, ApiError> {
        let record = self.redrivable(&request).await?;
        let (active, read) = replayed?;
        let RedriveRun { run_id, reason, from } = request;
        // Another redrive that went and ended while this one read wrote history past it; or
        // the run was deleted (retention) and a new one made under its id.
        let next_record = keys::history(&run_id, active.next_seq);
        let same_run = (record.created_ms, record.ended_ms) == (read.created_ms, read.ended_ms);
        if !same_run || self.store.get_chunked(&next_record).await.map_err(read_failure)?.is_some() {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "run {run_id} changed while its history was read for this redrive (redriven again, or deleted \
                     and started anew); retry"
                ),
            ));
        }
        if let Some(refused) = active.run.redrive_refused(&from) {
            return Err(redrive_refusal(&run_id, &refused));
        }
        batch.writes.set(keys::active(&run_id), Vec::new());
        batch.writes.clear(keys::run(&run_id));
        batch.writes.clear(keys::created(record.created_ms, &run_id));
        batch.writes.clear_range(keys::chunks_range(&keys::snapshot(&run_id)));
        self.runs.insert(run_id.clone(), Box::new(active));
        self.context.active_runs.fetch_add(1, Ordering::Relaxed);
        self.metrics.runs_active.increment(1.0);
        ::metrics::counter!(metrics::RUNS_REDRIVEN).increment(1);
        let reason = if reason.is_empty() { "redriven through the API".to_owned() } else { reason };
        let queued = self.runs[&run_id].run.plan().concurrency.is_some();
        self.apply_event(&run_id, Event::Redriven { reason, from, queued }, now_ms(), batch);
        let run = &self.runs.get(&run_id).expect("a run that ends stays until its batch commits").run;
        if run.is_queued() {
            self.ask_for_slot(run, None, batch);
        }
        let times = run.redriven().map_or(0, |redriven| redriven.times);
        Ok(RunRedriven { run_id, status: run.status(), times })
    }

    /// The record of an ended run that a redrive may take up; what stops it otherwise.
    async fn redrivable(&self, request: &RedriveRun) -> Result<RunRecord, ApiError> {
        let RedriveRun { run_id, from, .. } = request;
        if let Some(active) = self.runs.get(run_id) {
            return Err(match active.run.redrive_refused(from) {
                Some(refused) => redrive_refusal(run_id, &refused),
                // Ended in a batch not committed yet.
                None => ApiError::new(ErrorCode::Unavailable, format!("run {run_id} is ending right now; retry")),
            });
        }
        let record = self.ended_run(run_id).await?;
        if record.status == RunStatus::Succeeded && from.is_empty() {
            return Err(redrive_refusal(run_id, &RedriveRefused::Succeeded));
        }
        if announcement_waits(&*self.store, run_id).await? {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "the end of run {run_id} is not announced on the run-ends stream yet (is the stream \
                     available?); redrive it once it is"
                ),
            ));
        }
        self.check_room(0)?;
        Ok(record)
    }

    /// Pauses a running run (`pause`) or resumes a paused one. A repeat, or a run that
    /// ended, changes nothing and answers `applied: false`.
    pub(super) async fn pause_run(
        &mut self,
        request: PauseRun,
        pause: bool,
        batch: &mut Batch,
    ) -> Result<RunPaused, ApiError> {
        let PauseRun { run_id, reason } = request;
        let Some(active) = self.runs.get(&run_id) else {
            let status = self.ended_run(&run_id).await?.status;
            return Ok(RunPaused { run_id, status, paused: false, applied: false });
        };
        if active.run.is_paused() == pause {
            return Ok(RunPaused { run_id, status: active.run.status(), paused: pause, applied: false });
        }
        if pause && active.run.pauses() >= PAUSES_MAX {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "run {run_id} was paused {PAUSES_MAX} times, the most a run may be (each pause is kept in its \
                     history); let it run to its end, or cancel it"
                ),
            ));
        }
        let (event, counter) = if pause {
            let reason = if reason.is_empty() { "paused through the API".to_owned() } else { reason };
            (Event::PauseRequested { reason }, metrics::RUNS_PAUSED)
        } else {
            let reason = if reason.is_empty() { "resumed through the API".to_owned() } else { reason };
            (Event::ResumeRequested { reason }, metrics::RUNS_RESUMED)
        };
        let applied = self.apply_event(&run_id, event, now_ms(), batch);
        if applied {
            ::metrics::counter!(counter).increment(1);
        }
        // A run that ends stays in memory until its batch commits.
        let run = &self.runs.get(&run_id).expect("an active run stays until its batch commits").run;
        Ok(RunPaused { run_id, status: run.status(), paused: run.is_paused(), applied })
    }

    /// A signal for a signal step: applied if the step waits for one. A step that is over
    /// (or a run that ended) answers `applied: false`, so that a repeated signal is not an
    /// error, unless the step took a signal of the same `id` (sent again after its answer
    /// was lost); so does a step that waits again after a redrive, without taking it
    /// again. A step that is not a signal step, or has not started, is refused.
    pub(super) async fn signal_run(
        &mut self,
        request: SignalRun,
        batch: &mut Batch,
    ) -> Result<Answer<RunSignalled>, ApiError> {
        let SignalRun { run_id, step, data, id } = request;
        let Some(active) = self.runs.get(&run_id) else {
            // An ended run takes no signal, but a step it does not have (or that waits for
            // none) is refused as on a run that goes: a typo is no harmless no-op.
            let record = self.ended_run(&run_id).await?;
            let plan = self.pinned_plan(&record.flow, record.version).await.map_err(internal)?;
            if let Some(error) = flowgrid_engine::signal_step_refused(&plan, &step)
                .and_then(|refused| signal_refusal(&run_id, &step, &refused))
            {
                return Err(error);
            }
            let answer = RunSignalled { run_id, step, applied: false, status: record.status };
            return Ok(self.answer_repeated_signal(answer, id, batch));
        };
        match active.run.signal_refused(&step) {
            None => {
                if let Some(id) = &id {
                    if took_before_redrive(&*self.store, &batch.signals, &run_id, &active.run, &step, id).await? {
                        let status = active.run.status();
                        return Ok(Answer::Now(RunSignalled { run_id, step, applied: true, status }));
                    }
                }
                let taken = id.clone().map(|id| (run_id.clone(), step.clone(), id));
                let event = Event::SignalReceived { step: step.clone(), data, id };
                let applied = self.apply_event(&run_id, event, now_ms(), batch);
                if applied {
                    batch.signals.extend(taken);
                }
                // A run the signal ended stays in memory until its batch commits.
                let status = self.runs.get(&run_id).map_or(RunStatus::Succeeded, |active| active.run.status());
                Ok(Answer::Now(RunSignalled { run_id, step, applied, status }))
            }
            Some(refused) => match signal_refusal(&run_id, &step, &refused) {
                Some(error) => Err(error),
                None => {
                    let answer = RunSignalled { run_id, step, applied: false, status: active.run.status() };
                    Ok(self.answer_repeated_signal(answer, id, batch))
                }
            },
        }
    }

    /// The answer to a signal for a step that is over: `applied` if the step took a signal
    /// of this `id`, in `batch` or in its committed history. The history is read beside the
    /// actor, a page at a time: a long-running run's can be long.
    fn answer_repeated_signal(&self, answer: RunSignalled, id: Option<String>, batch: &Batch) -> Answer<RunSignalled> {
        let Some(id) = id else { return Answer::Now(answer) };
        if took_in(&batch.signals, &answer.run_id, &answer.step, &id) {
            return Answer::Now(RunSignalled { applied: true, ..answer });
        }
        let store = Arc::clone(&self.store);
        Answer::AfterRead(Box::pin(async move {
            let applied = took_signal(&*store, &answer.run_id, &answer.step, &id).await?;
            Ok(RunSignalled { applied, ..answer })
        }))
    }

    /// The run's view: from memory while it runs, from its snapshot once it ended. An ended
    /// run whose view was too large for a snapshot is rebuilt from its history beside the
    /// actor.
    pub(super) async fn get_run(&mut self, run_id: RunId) -> Result<Answer<RunView>, ApiError> {
        if let Some(active) = self.runs.get(&run_id) {
            return Ok(Answer::Now(active.run.view()));
        }
        if let Some(bytes) = self.store.get_chunked(&keys::snapshot(&run_id)).await.map_err(read_failure)? {
            return records::decode("run snapshot", &bytes).map(Answer::Now).map_err(internal);
        }
        // An ended run whose view was too large for a snapshot (`view_in_history`).
        let record = self.ended_run(&run_id).await?;
        let plan = self.pinned_plan(&record.flow, record.version).await.map_err(internal)?;
        let store = Arc::clone(&self.store);
        let evaluator = Arc::clone(self.context.plans.evaluator());
        Ok(Answer::AfterRead(Box::pin(async move {
            let rebuilt = super::reload::rebuild_ended(&*store, &run_id, &record, plan, &evaluator)
                .await
                .map_err(|error| history_unreadable(&run_id, &error))?;
            Ok(rebuilt.run.view())
        })))
    }

    /// Up to `limit` runs of this shard matching `query`, newest first, older than the
    /// cursor, within [`RunsPage::BYTES_MAX`] bytes (its stop point says where it ended).
    ///
    /// Active runs come from memory, ended runs from the listing index: an active run has
    /// no listing entry of its own (one written by an earlier version is skipped).
    pub(super) async fn list_runs(&self, query: &ListRuns, limit: usize) -> Result<RunsPage, ApiError> {
        let cursor = query.cursor.as_deref().map(parse_cursor).transpose()?;
        let in_window = |created_ms: Millis| {
            query.since_ms.is_none_or(|since_ms| created_ms >= since_ms)
                && query.until_ms.is_none_or(|until_ms| created_ms < until_ms)
        };
        let matches = |flow: &str, status: RunStatus, parent: Option<&RunId>, labels: Option<&Labels>| {
            query.flow.as_deref().is_none_or(|wanted| wanted == flow)
                && query.status.is_none_or(|wanted| wanted == status)
                && query.parent.as_ref().is_none_or(|wanted| Some(wanted) == parent)
                && has_labels(labels, &query.labels)
        };
        // The newest `limit` matching active runs, found without copying the others.
        let mut active: Vec<(Millis, &RunId, &Run)> = self
            .runs
            .iter()
            .map(|(run_id, active)| (active.run.created_ms(), run_id, &active.run))
            .filter(|(created_ms, run_id, run)| {
                in_window(*created_ms)
                    && matches(&run.plan().name, run.status(), run.parent().map(|parent| &parent.run_id), run.labels())
                    && cursor.as_ref().is_none_or(|cursor| (*created_ms, *run_id) < (cursor.0, &cursor.1))
            })
            .collect();
        active.sort_unstable_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)));
        active.truncate(limit);
        let mut runs: Vec<RunSummary> =
            active.into_iter().map(|(_, run_id, run)| active_summary(run_id, run)).collect();
        if query.status == Some(RunStatus::Running) {
            // The listing index holds no running run that is not in memory.
            let mut page = RunsPage { runs, scanned_to: None };
            page.end_within_bytes(Encoding::MsgPack);
            return Ok(page);
        }

        let mut range = keys::created_between(query.since_ms, query.until_ms);
        if let Some((created_ms, run_id)) = &cursor {
            range.end = range.end.min(keys::created(*created_ms, run_id));
        }
        let entries = self.store.scan(range, LIST_SCAN_ENTRIES_MAX, true).await.map_err(read_failure)?;
        let scanned_all = entries.len() < LIST_SCAN_ENTRIES_MAX;
        let last_key = entries.last().map(|(key, _)| key.clone());
        let mut ended = 0;
        for (_, value) in entries {
            let summary: RunSummary = records::decode("run summary", &value).map_err(internal)?;
            if matches(&summary.flow, summary.status, summary.parent.as_ref(), Some(&summary.labels))
                && !self.runs.contains_key(&summary.run_id)
            {
                runs.push(summary);
                ended += 1;
                if ended == limit {
                    break;
                }
            }
        }
        // Cut short before it found `limit` matches: the caller must not take what it did
        // not look at for the end of the list.
        let scanned_to = match last_key {
            Some(key) if !scanned_all && ended < limit => {
                let (created_ms, run_id) = keys::decode_created(&key).map_err(internal)?;
                Some((created_ms, run_id))
            }
            _ => None,
        };
        // Both parts are newest first: merge them and keep the newest `limit`.
        runs.sort_by(|a, b| (b.created_ms, &b.run_id).cmp(&(a.created_ms, &a.run_id)));
        runs.truncate(limit);
        // Sent as MessagePack to the coordinator that asked, maybe over NATS.
        let mut page = RunsPage { runs, scanned_to };
        page.end_within_bytes(Encoding::MsgPack);
        Ok(page)
    }

    /// The record of a run that is not in memory, so has ended; `not_found` when there is
    /// no such run (or it was deleted after its retention).
    async fn ended_run(&self, run_id: &RunId) -> Result<RunRecord, ApiError> {
        self.run_record(run_id).await?.ok_or_else(|| not_found(run_id))
    }

    /// Fails for a run held back at the reload (see [`ShardActor::held_back`]): it is
    /// neither ended nor to be started again.
    async fn run_record(&self, run_id: &RunId) -> Result<Option<RunRecord>, ApiError> {
        if let Some(refusal) = self.held_back_refusal(run_id) {
            return Err(refusal);
        }
        match self.store.get(&keys::run(run_id)).await.map_err(read_failure)? {
            Some(bytes) => records::decode("run record", &bytes).map(Some).map_err(internal),
            None => Ok(None),
        }
    }
}

impl<S: ShardStore> ShardActor<S> {
    /// The refusal of every request about a run held back at the reload; `None` for others.
    pub(super) fn held_back_refusal(&self, run_id: &RunId) -> Option<ApiError> {
        let why = self.held_back.get(run_id)?;
        Some(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "run {run_id} is in shard {}'s store but could not be loaded ({why}); it is kept as it is until a \
                 coordinator that can read it serves the shard",
                self.shard
            ),
        ))
    }
}

/// Whether the announcement of the run's last end still waits in the outbox: a redrive
/// would end the run again and write its next announcement over it, so that the earlier
/// end would never be announced. Outbox messages are chunked records (their chunks are
/// what the store holds), so the chunk range is looked at, not the record key.
async fn announcement_waits<S: ShardStore>(store: &S, run_id: &RunId) -> Result<bool, ApiError> {
    let key = keys::outbox(run_id, records::OUTBOX_RUN_ENDED);
    let chunks = store.scan(keys::chunks_range(&key), 1, false).await.map_err(read_failure)?;
    Ok(!chunks.is_empty())
}

/// The refusal of a read or redrive whose run could not be rebuilt from its history.
fn history_unreadable(run_id: &RunId, error: &crate::error::Error) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("cannot load run {run_id} from its history: {error}"))
}

/// The announcement of a run's end as the run-ends stream is to carry it: at most a
/// payload as JSON, the form it is published in (the check of the output above counts
/// MessagePack, in which floats and escaped text take fewer bytes). Over it, its output
/// gives way to a `payload_too_large` error (the run's own error, if it has one, stays),
/// and an error message still too long is cut to fit. An announcement over what NATS
/// carries would otherwise be published again and again, and never get through.
fn announcement_within(mut ended: RunEnded, payload_max: usize) -> RunEnded {
    let bytes = json_bytes(&ended);
    if bytes <= payload_max {
        return ended;
    }
    if ended.output.take().is_some() && ended.error.is_none() {
        let message = format!(
            "its end's announcement is {bytes} bytes as JSON, over the limit of {payload_max}: give the flow an \
             `output` expression that picks what the services reading its ends need, or pass large data by reference"
        );
        ended.error = Some(TaskError { code: PAYLOAD_TOO_LARGE.to_owned(), message, retryable: false });
    }
    let over = json_bytes(&ended).saturating_sub(payload_max);
    if let (true, Some(error)) = (over > 0, ended.error.as_mut()) {
        flowgrid_model::limits::cut_to_fit(&mut error.message, over, ANNOUNCEMENT_CUT_MARK);
    }
    ended
}

/// A child's end as its parent is to get it: at most `bytes_max` as MessagePack, the form
/// it is sent in. Over it, its output gives way to a `payload_too_large` error whose
/// message `output_over` makes from the end's size (the child's own error, if it has one,
/// stays), and an error message still too long is cut to fit, its code kept. A child's
/// error grows with each level of sub-flows it passes through (each parent's step names
/// its child), and an end over what NATS carries would otherwise be sent again and again,
/// and never get through.
pub(super) fn child_end_within(
    mut ended: ChildRunEnded,
    bytes_max: usize,
    output_over: impl FnOnce(usize) -> String,
) -> ChildRunEnded {
    let bytes = records::encode(&ended).len();
    if bytes <= bytes_max {
        return ended;
    }
    if ended.output.take().is_some() && ended.error.is_none() {
        let message = output_over(bytes);
        ended.error = Some(TaskError { code: PAYLOAD_TOO_LARGE.to_owned(), message, retryable: false });
    }
    let over = records::encode(&ended).len().saturating_sub(bytes_max);
    if let (true, Some(error)) = (over > 0, ended.error.as_mut()) {
        flowgrid_model::limits::cut_to_fit(&mut error.message, over, CHILD_END_CUT_MARK);
    }
    ended
}

/// Room past the payload limit for a child's end's own fields (run ids, step, status): an
/// output at the limit is passed on, and the end stays within what a NATS server whose
/// `max_payload` carries a payload carries ([`flowgrid_proto::max_payload_needed`]).
const CHILD_END_FIELDS_BYTES: usize = 1024;

/// The error code of an output a run cannot pass on: over the payload limit.
const PAYLOAD_TOO_LARGE: &str = "payload_too_large";

/// Ends an error message [`announcement_within`] cut.
const ANNOUNCEMENT_CUT_MARK: &str = " [cut to fit the announcement]";

/// Ends an error message [`child_end_within`] cut.
const CHILD_END_CUT_MARK: &str = " [cut to fit the message to the parent]";

/// The headroom past `--active-runs-max` kept for the child runs of each level of
/// sub-flows, as a share of the bound (an eighth), at least one run: a child `depth` deep
/// is refused only past the bound and `depth` such shares. Children that had to wait for
/// the bound like any start could never start once their parents filled it, and parents
/// that wait for them would never end. With the headroom every level can start some
/// children, so the runs above them can end; memory stays bounded, at most twice the
/// bound with sub-flows nested as deep as they may be.
const CHILD_HEADROOM_SHARE: u64 = 8;

/// How long a run that ends at `ended_ms` went, in seconds, as [`metrics::RUN_DURATION`]
/// records it: from its start, or from its last redrive when it was redriven (the time it
/// sat ended before that, and its earlier rounds, counted when they ended).
fn run_seconds(created_ms: Millis, redriven: Option<Redriven>, ended_ms: Millis) -> f64 {
    let went_ms = redriven.map_or(created_ms, |redriven| redriven.last_ms);
    ended_ms.saturating_sub(went_ms) as f64 / 1_000.0
}

/// The active runs a coordinator with the bound `active_runs_max` may hold before it
/// refuses a run `depth` deep as a child (0: a run no subflow step starts).
fn active_runs_allowed(active_runs_max: u64, depth: u32) -> u64 {
    let headroom = (active_runs_max / CHILD_HEADROOM_SHARE).max(1);
    active_runs_max.saturating_add(headroom.saturating_mul(u64::from(depth.min(SUBFLOW_DEPTH_MAX))))
}

/// A run's final snapshot may take at most this share of a commit's bytes: the commit
/// that ends a run also holds the event that ended it (up to a payload's size) and other
/// runs' events.
const SNAPSHOT_SHARE_MAX: usize = 4;

/// The error code of an attempt whose worker sent a result the grid does not take (an
/// output nested too deeply, an unusable error code): the attempt fails with it, so the
/// run goes on (a catch, a retry) instead of waiting for the attempt's timeout.
const INVALID_OUTPUT: &str = "invalid_output";

fn invalid_output(problem: String) -> TaskError {
    TaskError { code: INVALID_OUTPUT.to_owned(), message: problem, retryable: false }
}

/// What is wrong with a value a worker sent, if it nests deeper than the grid keeps.
fn too_deep(what: &str, value: &Value, limits: &Limits) -> Option<String> {
    let depth = nesting_depth(value);
    (depth > limits.nesting_depth_max).then(|| {
        format!("the task's {what} is nested {depth} levels deep, over the limit of {}", limits.nesting_depth_max)
    })
}

/// What is wrong with a worker's error, if anything: its code must name the failure in a
/// few printable characters, as retry policies and catches match it.
fn error_problem(error: &TaskError, limits: &Limits) -> Option<String> {
    Some(match limits.error_code_problem(&error.code)? {
        ErrorCodeProblem::Blank => format!("the task failed with an empty error code ({})", cut(&error.message)),
        ErrorCodeProblem::NotTaken => format!(
            "the task failed with an error code the grid does not take (at most {} bytes, no control characters): \
             {:?} ({})",
            limits.name_bytes_max,
            cut(&error.code),
            cut(&error.message)
        ),
    })
}

/// Why a redrive is refused, and what to do instead.
fn redrive_refusal(run_id: &RunId, refused: &RedriveRefused) -> ApiError {
    match refused {
        RedriveRefused::Going => ApiError::new(
            ErrorCode::Conflict,
            format!(
                "run {run_id} is still running; a run is redriven once it has ended (to hold its next steps \
                 meanwhile, pause it: `flowgrid run pause {run_id}`)"
            ),
        ),
        RedriveRefused::Succeeded => ApiError::new(
            ErrorCode::Conflict,
            format!(
                "run {run_id} succeeded; there is nothing to run again unless you name a step to run again \
                 from (`from`, `--from` on the command line), or start a new run"
            ),
        ),
        RedriveRefused::Child { parent } => ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "run {run_id} is a child run of step `{}` of run {}, which took its end already; redrive run {} \
                 instead: the step starts a new child",
                parent.step, parent.run_id, parent.run_id
            ),
        ),
        RedriveRefused::TooOften { times } => ApiError::new(
            ErrorCode::Conflict,
            format!("run {run_id} was redriven {times} times, the most a run may be; start a new run"),
        ),
        RedriveRefused::NoSuchStep { step } => ApiError::new(
            ErrorCode::InvalidRequest,
            format!("run {run_id} has no step `{step}` to run again from (see its steps with `flowgrid run get`)"),
        ),
        RedriveRefused::Skipped { step } => ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "step `{step}` of run {run_id} was skipped, and the steps before it would skip it again; run \
                 again from the step that decided (a choice, a step whose failure a catch took) or one before it"
            ),
        ),
    }
}

/// Whether signal step `step` of `run`, which would take a signal now, took the signal of
/// this `id` in an earlier try of the run (it waits again after a redrive, and the sender,
/// whose answer was lost, sends that signal again): that one is answered as taken, not
/// taken a second time. Only a redriven run's step can wait again after taking a signal,
/// so only a redriven run's history is read; in the actor, which applies the signal right
/// after if it is a new one.
async fn took_before_redrive<S: ShardStore>(
    store: &S,
    batch_signals: &[(RunId, String, String)],
    run_id: &RunId,
    run: &Run,
    step: &str,
    id: &str,
) -> Result<bool, ApiError> {
    if run.redriven().is_none() {
        return Ok(false);
    }
    Ok(took_in(batch_signals, run_id, step, id) || took_signal(store, run_id, step, id).await?)
}

/// Whether a batch not yet committed gave step `step` of the run a signal of this `id`, as
/// its `signals` (`Batch::signals`) say.
fn took_in(signals: &[(RunId, String, String)], run_id: &RunId, step: &str, id: &str) -> bool {
    signals.iter().any(|(run, took, took_id)| run == run_id && took == step && took_id == id)
}

/// Whether step `step` of the run took a signal of this `id`, as its committed history
/// says (see [`took_in`] for the batch not yet committed); reads it a page at a time.
async fn took_signal<S: ShardStore>(store: &S, run_id: &RunId, step: &str, id: &str) -> Result<bool, ApiError> {
    // Record 0 is the run's start; every later one an event.
    let mut after = Some(0);
    while let Some(seq) = after {
        let page = super::history::history_page(store, run_id.clone(), Some(seq), PAGE_RECORDS_MAX).await?;
        let took = page.records.iter().any(|record| {
            matches!(&record.event, Some(Event::SignalReceived { step: took, id: Some(took_id), .. })
                if took == step && took_id == id)
        });
        if took {
            return Ok(true);
        }
        after = page.next;
    }
    Ok(false)
}

/// Why a signal is refused, and what to do about it; `None` for a step that is over, whose
/// repeated signal is answered `applied: false` instead.
fn signal_refusal(run_id: &RunId, step: &str, refused: &SignalRefused) -> Option<ApiError> {
    Some(match refused {
        SignalRefused::NoSuchStep => ApiError::new(
            ErrorCode::NotFound,
            format!("the flow of run {run_id} has no step `{step}`: name a signal step of it"),
        ),
        SignalRefused::NotASignalStep { kind } => ApiError::new(
            ErrorCode::InvalidRequest,
            format!("step `{step}` of run {run_id} is a {kind} step; only a `signal` step takes signals"),
        ),
        SignalRefused::NotStarted => ApiError::new(
            ErrorCode::Conflict,
            format!(
                "step `{step}` of run {run_id} has not started: the steps before it are still going; send the \
                 signal once it waits (`flowgrid run get` shows it `running`), or give the step `keep_early: true` \
                 in a new version of the flow to keep signals sent before it starts"
            ),
        ),
        SignalRefused::Over { .. } => return None,
    })
}

// The in-flight gauge counts an attempt from its dispatch until its timeout leaves the
// wheel: cancelled (a result closed it, or its step or run ended) or fired.

pub(super) fn attempt_opened(metrics: &mut ShardMetrics, task: &TaskDispatch) {
    metrics.pool(&task.pool).in_flight.increment(1.0);
}

/// Takes a closed attempt out of its pool's in-flight gauge; returns its pool.
pub(super) fn attempt_closed<'plan>(
    metrics: &mut ShardMetrics,
    plan: &'plan FlowPlan,
    attempt: &AttemptId,
) -> Option<&'plan Arc<str>> {
    let pool = pool_of(plan, &attempt.step)?;
    metrics.pool(pool).in_flight.decrement(1.0);
    Some(pool)
}

/// Counts the result an accepted event applied, by pool and outcome. A fired timeout
/// also closes its attempt (it left the wheel without a `CancelTimer`).
fn count_result(metrics: &mut ShardMetrics, plan: &FlowPlan, event: &Event) {
    let (attempt, count): (_, fn(&TaskMetrics)) = match event {
        Event::TaskSucceeded { attempt, .. } => (attempt, |pool| pool.succeeded.increment(1)),
        Event::TaskFailed { attempt, .. } => (attempt, |pool| pool.failed.increment(1)),
        Event::TimerFired { timer: TimerKey::AttemptTimeout { attempt } } => (attempt, |pool| {
            pool.timed_out.increment(1);
            pool.in_flight.decrement(1.0);
        }),
        _ => return,
    };
    if let Some(pool) = pool_of(plan, &attempt.step) {
        count(metrics.pool(pool));
    }
}

fn pool_of<'plan>(plan: &'plan FlowPlan, step: &str) -> Option<&'plan Arc<str>> {
    plan.step_index(step).and_then(|index| match &plan.step(index).kind {
        PlanStepKind::Task(spec) | PlanStepKind::Map { spec, .. } => Some(&spec.pool),
        _ => None,
    })
}

/// The listing line of a run in memory: one that has not ended, or whose end is not
/// committed yet (listed as `run get` shows it).
fn active_summary(run_id: &RunId, run: &Run) -> RunSummary {
    let plan = run.plan();
    RunSummary {
        run_id: run_id.clone(),
        flow: plan.name.clone(),
        version: plan.version,
        status: run.status(),
        created_ms: run.created_ms(),
        ended_ms: run.ended_ms(),
        parent: run.parent().map(|parent| parent.run_id.clone()),
        paused: run.is_paused(),
        queued: run.is_queued(),
        delayed: run.is_delayed(),
        labels: run.labels().cloned().unwrap_or_default(),
    }
}

/// The listing entry of a run that ended with `record`.
fn summary(run_id: &RunId, record: &RunRecord, parent: Option<RunId>, labels: Labels) -> RunSummary {
    RunSummary {
        run_id: run_id.clone(),
        flow: record.flow.clone(),
        version: record.version,
        status: record.status,
        created_ms: record.created_ms,
        ended_ms: record.ended_ms,
        parent,
        paused: false,
        queued: false,
        delayed: false,
        labels,
    }
}

impl RunsPage {
    /// A page of a run listing (a shard's, and the API's reply) ends before this many bytes
    /// of summaries, with one run at least: far below the largest NATS message (1 MiB by
    /// default), which 1,000 runs with 16 labels of the largest size (about 5.3 KB each)
    /// would be five times over.
    pub const BYTES_MAX: usize = 512 * 1024;

    /// Ends the page, its runs newest first, before [`RunsPage::BYTES_MAX`] bytes of
    /// summaries in `encoding`, keeping one run at least. Where it ends the page early, its
    /// last run becomes the page's stop point (unless the page stopped at a newer run
    /// already): every matching run newer than it is on the page, so a listing goes on with
    /// the runs older than it, skipping none. Returns whether it ended the page early.
    pub fn end_within_bytes(&mut self, encoding: Encoding) -> bool {
        let mut bytes = 0usize;
        let fits = self
            .runs
            .iter()
            .take_while(|run| {
                let size = flowgrid_proto::encode(encoding, run).map_or(0, |encoded| encoded.len());
                bytes = bytes.saturating_add(size);
                bytes <= Self::BYTES_MAX
            })
            .count()
            .max(1);
        if fits >= self.runs.len() {
            return false;
        }
        self.runs.truncate(fits);
        let last = self.runs.last().map(|run| (run.created_ms, run.run_id.clone()));
        self.scanned_to = self.scanned_to.take().max(last);
        true
    }
}

/// The cursor of a page that ends at this run.
pub fn cursor_of(summary: &RunSummary) -> String {
    cursor(summary.created_ms, &summary.run_id)
}

/// The cursor of a listing that goes on with the runs older than `(created_ms, run_id)`.
pub fn cursor(created_ms: Millis, run_id: &RunId) -> String {
    format!("{created_ms}.{run_id}")
}

fn parse_cursor(cursor: &str) -> Result<(Millis, RunId), ApiError> {
    let parsed =
        cursor.split_once('.').and_then(|(created, run_id)| Some((created.parse().ok()?, RunId(run_id.into()))));
    parsed.ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("cursor {cursor:?} is malformed; pass the `next_cursor` of the previous page"),
        )
    })
}

pub(super) fn not_found(run_id: &RunId) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no run {run_id}"))
}

/// What a caller is told when a store read fails: retryable when the store may answer later.
pub(super) fn read_failure(error: flowgrid_store::Error) -> ApiError {
    if error.may_pass_later() {
        ApiError::new(ErrorCode::Unavailable, format!("store read failed: {error}; retry"))
    } else {
        internal(error)
    }
}

pub(super) fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("store: {error}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A redriven run's duration counts from its last redrive, not from its creation: the
    /// hours it sat failed before it was redriven are no part of it.
    #[test]
    fn a_redriven_runs_duration_counts_from_its_last_redrive() {
        let created_ms = 1_767_225_600_000;
        assert_eq!(run_seconds(created_ms, None, created_ms + 1_500), 1.5);
        // Failed, redriven two hours after its start, ended again half a second later.
        let redriven = Redriven { times: 1, last_ms: created_ms + 7_200_000 };
        assert_eq!(run_seconds(created_ms, Some(redriven), redriven.last_ms + 500), 0.5);
        assert_eq!(
            run_seconds(created_ms, Some(redriven), redriven.last_ms - 1),
            0.0,
            "a clock set back: not below zero"
        );
    }

    #[test]
    fn a_failed_read_is_retryable_unless_the_data_is_at_fault() {
        let io = flowgrid_store::Error::Backend(Box::new(std::io::Error::other("Input/output error")));
        let refusal = read_failure(io);
        assert_eq!(refusal.code, ErrorCode::Unavailable);
        assert!(refusal.retryable && refusal.message.contains("Input/output error"), "{refusal:?}");
        let corrupt = flowgrid_store::Error::Corrupt { key: "run/x".into(), detail: "truncated".into() };
        let refusal = read_failure(corrupt);
        assert_eq!(refusal.code, ErrorCode::Internal);
        assert!(!refusal.retryable, "{refusal:?}");
    }

    /// Each level of children has headroom past the bound, so a child start is refused later
    /// than a start at the top, and a grandchild's later still; memory stays bounded.
    #[test]
    fn child_runs_have_headroom_past_the_active_runs_bound_by_depth() {
        assert_eq!(active_runs_allowed(800, 0), 800, "a run at the top waits at the bound");
        assert_eq!(active_runs_allowed(800, 1), 900);
        assert_eq!(active_runs_allowed(800, 2), 1_000);
        assert_eq!(active_runs_allowed(800, SUBFLOW_DEPTH_MAX), 1_600, "twice the bound at most");
        assert_eq!(active_runs_allowed(800, u32::MAX), 1_600, "a depth past the limit counts as the limit");
        assert_eq!(active_runs_allowed(2, 1), 3, "at least one more run per level");
        assert_eq!(active_runs_allowed(u64::MAX, 1), u64::MAX);
    }

    fn ended(output: Option<Value>, error: Option<TaskError>) -> RunEnded {
        let status = if error.is_some() && output.is_none() { RunStatus::Failed } else { RunStatus::Succeeded };
        RunEnded {
            run_id: RunId::from_idempotency_key("wide", "1"),
            flow: "wide".to_owned(),
            version: 1,
            status,
            created_ms: 1,
            ended_ms: 2,
            output,
            error,
            redriven: 0,
        }
    }

    /// A run's end is announced as JSON: its output is bounded by JSON's size, not by the
    /// MessagePack's that bounds what the run passes on (a float takes 9 bytes of
    /// MessagePack and up to 25 of JSON). Over the limit, the output gives way to an error
    /// that says so, and an error message too long is cut; under it, nothing changes.
    #[test]
    fn a_run_end_is_announced_within_a_payload_as_json() {
        const PAYLOAD_MAX: usize = 64 * 1024;
        let floats = json!(vec![-1.234_567_890_123_456_7e-123; PAYLOAD_MAX / 16]);
        assert!(records::encode(&floats).len() < PAYLOAD_MAX, "within the limit as MessagePack");
        let announced = announcement_within(ended(Some(floats), None), PAYLOAD_MAX);
        let bytes = json_bytes(&announced);
        assert!(bytes <= PAYLOAD_MAX, "{bytes} bytes of JSON");
        let error = announced.error.expect("an error in place of the output");
        assert_eq!(
            (announced.status, announced.output, error.code.as_str()),
            (RunStatus::Succeeded, None, "payload_too_large")
        );
        assert!(error.message.contains("as JSON, over the limit of 65536"), "{}", error.message);

        // A failed run's error message too long: cut to fit, its code kept; one of control
        // characters (6 bytes of JSON each) too.
        let mut long = TaskError { code: "boom".to_owned(), message: "e".repeat(PAYLOAD_MAX), retryable: true };
        let announced = announcement_within(ended(None, Some(long.clone())), PAYLOAD_MAX);
        let bytes = json_bytes(&announced);
        let error = announced.error.expect("its error");
        assert!(bytes <= PAYLOAD_MAX && bytes > PAYLOAD_MAX - 64, "{bytes} bytes of JSON");
        assert_eq!((error.code.as_str(), error.retryable), ("boom", true));
        assert!(error.message.ends_with(ANNOUNCEMENT_CUT_MARK), "{:.80}", error.message);
        let escaped = TaskError { message: "\u{1}".repeat(PAYLOAD_MAX), ..long.clone() };
        let bytes = json_bytes(&announcement_within(ended(None, Some(escaped)), PAYLOAD_MAX));
        assert!(bytes <= PAYLOAD_MAX, "{bytes} bytes of JSON");

        // Within the limit: as it is.
        long.message.truncate(100);
        let small = ended(Some(json!({"n": 0.5})), None);
        assert_eq!(announcement_within(small.clone(), PAYLOAD_MAX), small);
        let failed = ended(None, Some(long));
        assert_eq!(announcement_within(failed.clone(), PAYLOAD_MAX), failed);
    }

    fn child_ended(output: Option<Value>, error: Option<TaskError>) -> ChildRunEnded {
        let status = if error.is_some() && output.is_none() { RunStatus::Failed } else { RunStatus::Succeeded };
        ChildRunEnded {
            parent: RunId::from_idempotency_key("parent", "1"),
            step: "invoke".to_owned(),
            item: Some(7),
            child: RunId::from_idempotency_key("child", "1"),
            status,
            output,
            error,
            refused: false,
        }
    }

    /// A child's end is bounded like its announcement: an error message too long (grown
    /// through levels of sub-flows) is cut to fit, its code kept; an output over the bound
    /// gives way to a `payload_too_large` error; within it, nothing changes.
    #[test]
    fn a_child_end_is_sent_within_its_bound() {
        const PAYLOAD_MAX: usize = 64 * 1024;
        let no_output = |bytes: usize| -> String { panic!("no output to leave out ({bytes} bytes)") };
        let long = TaskError { code: "boom".to_owned(), message: "e".repeat(PAYLOAD_MAX), retryable: false };
        let ended = child_end_within(child_ended(None, Some(long.clone())), PAYLOAD_MAX, no_output);
        let bytes = records::encode(&ended).len();
        assert!(bytes <= PAYLOAD_MAX && bytes > PAYLOAD_MAX - 64, "{bytes} bytes");
        let error = ended.error.as_ref().expect("its error");
        assert_eq!((ended.status, error.code.as_str(), error.retryable), (RunStatus::Failed, "boom", false));
        assert!(error.message.ends_with(CHILD_END_CUT_MARK), "{:.80}", error.message);
        let multibyte = TaskError { message: "é".repeat(PAYLOAD_MAX), ..long.clone() };
        let ended = child_end_within(child_ended(None, Some(multibyte)), PAYLOAD_MAX, no_output);
        assert!(records::encode(&ended).len() <= PAYLOAD_MAX, "cut on a character's boundary");

        // An output over the bound (the NATS server's, smaller than the payload limit).
        let wide = json!(["x".repeat(PAYLOAD_MAX)]);
        let mut told = 0;
        let output_over = |bytes| {
            told = bytes;
            "over the server's bound".to_owned()
        };
        let ended = child_end_within(child_ended(Some(wide), None), PAYLOAD_MAX / 2, output_over);
        assert!(told > PAYLOAD_MAX, "the end's size is told: {told}");
        let error = ended.error.as_ref().expect("an error in place of the output");
        assert_eq!(
            (ended.status, &ended.output, error.code.as_str()),
            (RunStatus::Succeeded, &None, "payload_too_large")
        );
        assert_eq!(error.message, "over the server's bound");

        // Within the bound: as it is.
        let small = child_ended(Some(json!({"n": 0.5})), None);
        assert_eq!(child_end_within(small.clone(), PAYLOAD_MAX, no_output), small);
        let failed = child_ended(None, Some(TaskError { message: "e".repeat(100), ..long }));
        assert_eq!(child_end_within(failed.clone(), PAYLOAD_MAX, no_output), failed);
    }

    /// A signal's id is found however far into a long history it was taken: the lookup
    /// reads the history page after page, and stops at the run's last record.
    #[tokio::test]
    async fn a_taken_signal_is_found_past_the_first_page_of_the_history() {
        use flowgrid_store::{StoreLimits, WriteBatch};

        use crate::shard::testing::{test_shard, TestShard};

        let TestShard { _dir, file, epoch } = test_shard().await;
        let limits = StoreLimits::default();
        let run_id = RunId::from_idempotency_key("f", "long");
        let neighbour = RunId::from_idempotency_key("f", "neighbour");
        let signal = |step: &str, id: &str| Event::SignalReceived {
            step: step.to_owned(),
            data: Value::Null,
            id: Some(id.to_owned()),
        };
        let mut batch = WriteBatch::new();
        let records = 3 * PAGE_RECORDS_MAX as u64;
        for seq in 1..=records {
            let event = match seq {
                // The last record of the second page and the last record of all.
                seq if seq == 2 * PAGE_RECORDS_MAX as u64 => signal("approve", "from-ana"),
                seq if seq == records => signal("approve", "from-bob"),
                _ => Event::TimerFired { timer: TimerKey::RunTimeout },
            };
            let record = EventRecord { now_ms: seq, event, epoch: epoch.0 };
            batch.insert_chunked(&keys::history(&run_id, seq), &records::encode(&record), &limits);
        }
        // Another run's signal is not the run's, wherever its history lies in key order.
        let other = EventRecord { now_ms: 1, event: signal("approve", "from-eve"), epoch: epoch.0 };
        batch.insert_chunked(&keys::history(&neighbour, 1), &records::encode(&other), &limits);
        file.commit(epoch, batch).await.unwrap();

        for (step, id, taken) in [
            ("approve", "from-ana", true),
            ("approve", "from-bob", true),
            ("approve", "from-carl", false),
            ("review", "from-ana", false),
        ] {
            assert_eq!(took_signal(&file, &run_id, step, id).await.unwrap(), taken, "{step} {id}");
        }
        assert!(!took_signal(&file, &run_id, "approve", "from-eve").await.unwrap());
        assert!(took_signal(&file, &neighbour, "approve", "from-eve").await.unwrap());
    }

    /// A signal step that waits again after a redrive from it takes a new signal; the one it
    /// took before, sent again under its id (its answer was lost), is answered as taken and
    /// not taken a second time.
    #[tokio::test]
    async fn a_signal_taken_before_a_redrive_is_not_taken_again_by_the_waiting_step() {
        use flowgrid_model::{parse_definition, Evaluator};
        use flowgrid_store::{StoreLimits, WriteBatch};

        use crate::shard::testing::{test_shard, TestShard};

        const FLOW: &str = r##"
name: approvals
steps:
  - { kind: signal, id: approve }
  - { kind: task, id: ship, after: [approve], pool: cpu, task: ship }
"##;
        let limits = Limits::default();
        let evaluator = Evaluator::new(&limits);
        let definition = parse_definition(FLOW, &limits).unwrap();
        let plan = Arc::new(FlowPlan::compile(definition, 1, &evaluator, &limits).unwrap());
        let run_id = RunId::from_idempotency_key("approvals", "1");
        let start = RunStart {
            run_id: run_id.clone(),
            input: json!({}),
            labels: Labels::new(),
            now: 1,
            queued: false,
            start_at: None,
        };
        let mut run = Run::start(plan, &evaluator, start, &mut Vec::new());
        let signal = |id: &str| Event::SignalReceived {
            step: "approve".to_owned(),
            data: json!({ "by": id }),
            id: Some(id.to_owned()),
        };
        let ship_failed = Event::TaskFailed {
            attempt: AttemptId { run_id: run_id.clone(), step: "ship".to_owned(), item: None, attempt: 1 },
            error: TaskError { code: "broken".to_owned(), message: "no courier".to_owned(), retryable: false },
        };
        let redriven = Event::Redriven { reason: "again".to_owned(), from: vec!["approve".to_owned()], queued: false };
        // The run's history as the actor writes it: every event it took, from record 1 on.
        let TestShard { _dir, file, epoch } = test_shard().await;
        let store_limits = StoreLimits::default();
        let mut history = WriteBatch::new();
        for (seq, event) in (1..).zip([signal("a"), ship_failed, redriven]) {
            assert_eq!(run.apply(&evaluator, seq, &event, &mut Vec::new()), Applied::Accepted, "{event:?}");
            let record = EventRecord { now_ms: seq, event, epoch: epoch.0 };
            history.insert_chunked(&keys::history(&run_id, seq), &records::encode(&record), &store_limits);
        }
        file.commit(epoch, history).await.unwrap();
        let approve = |run: &Run| run.view().steps.into_iter().find(|step| step.id == "approve").unwrap();
        assert_eq!(run.signal_refused("approve"), None, "the step waits again");

        assert!(took_before_redrive(&file, &[], &run_id, &run, "approve", "a").await.unwrap());
        assert_eq!(approve(&run).status, flowgrid_engine::StepStatus::Running, "a repeat is not taken");
        assert!(!took_before_redrive(&file, &[], &run_id, &run, "approve", "b").await.unwrap());
        assert_eq!(run.apply(&evaluator, 4, &signal("b"), &mut Vec::new()), Applied::Accepted);
        let approve = approve(&run);
        assert_eq!(
            (approve.status, approve.output),
            (flowgrid_engine::StepStatus::Succeeded, Some(json!({"by": "b"})))
        );
    }

    /// An ended run's summary with 16 labels of the largest size: about 5.3 KB of
    /// MessagePack.
    fn labelled_run(created_ms: Millis) -> RunSummary {
        let labels = (0..flowgrid_model::labels::LABELS_MAX)
            .map(|n| (format!("{n:0>64}"), "v".repeat(flowgrid_model::labels::LABEL_VALUE_BYTES_MAX)))
            .collect();
        let record = RunRecord {
            flow: "wide".to_owned(),
            version: 1,
            status: RunStatus::Succeeded,
            created_ms,
            ended_ms: Some(created_ms + 1),
            view_in_history: false,
        };
        summary(&RunId(format!("run-{created_ms:04}").into()), &record, None, labels)
    }

    fn msgpack_bytes(runs: &[RunSummary]) -> usize {
        runs.iter().map(|run| flowgrid_proto::encode(Encoding::MsgPack, run).unwrap().len()).sum()
    }

    /// A shard's page of 300 runs with large labels (1.6 MB) ends before 512 KiB of them as
    /// MessagePack, at its last run, which becomes its stop point; a scan that stopped at a
    /// newer run keeps that stop; a page within the bound, and one run alone however large,
    /// are left whole.
    #[test]
    fn a_shard_s_run_page_ends_before_its_byte_bound_at_the_last_run_it_keeps() {
        let runs: Vec<RunSummary> = (0..300).rev().map(labelled_run).collect();
        assert!(msgpack_bytes(&runs) > 2 * RunsPage::BYTES_MAX, "{} bytes", msgpack_bytes(&runs));
        let mut page = RunsPage { runs: runs.clone(), scanned_to: None };
        assert!(page.end_within_bytes(Encoding::MsgPack));
        let kept = page.runs.len();
        assert!(kept > 1 && runs[..kept] == page.runs[..], "the newest {kept} runs in order");
        assert!(msgpack_bytes(&page.runs) <= RunsPage::BYTES_MAX, "{} bytes", msgpack_bytes(&page.runs));
        assert!(msgpack_bytes(&runs[..=kept]) > RunsPage::BYTES_MAX, "one more run would not fit");
        let last = &page.runs[kept - 1];
        assert_eq!(page.scanned_to, Some((last.created_ms, last.run_id.clone())), "the listing goes on after it");

        let newer_stop = Some((runs[2].created_ms, runs[2].run_id.clone()));
        let mut page = RunsPage { runs: runs.clone(), scanned_to: newer_stop.clone() };
        assert!(page.end_within_bytes(Encoding::MsgPack));
        assert_eq!(page.scanned_to, newer_stop, "its runs past the scan's stop were not all looked at");

        let mut small = RunsPage { runs: runs[..10].to_vec(), scanned_to: None };
        assert!(!small.end_within_bytes(Encoding::MsgPack));
        assert_eq!((small.runs.len(), small.scanned_to), (10, None));
        let mut huge = labelled_run(1);
        huge.flow = "f".repeat(2 * RunsPage::BYTES_MAX);
        let mut alone = RunsPage { runs: vec![huge.clone(), labelled_run(0)], scanned_to: None };
        assert!(alone.end_within_bytes(Encoding::MsgPack));
        assert_eq!(alone.runs, vec![huge.clone()], "one run at least");
        assert_eq!(alone.scanned_to, Some((huge.created_ms, huge.run_id)));
    }
}
