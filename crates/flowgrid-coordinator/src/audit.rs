//! Offline audit of a stopped grid's embedded store: reads every run of every shard file
//! and checks the invariants a grid must keep through crashes and hand-overs.
//!
//! Per run, from its history (`("hist", run, seq)`, record 0 the start, then one record per
//! accepted event, each with the epoch it was committed under):
//! - the sequence numbers are contiguous from 0 (a gap means a lost commit or a torn write);
//! - no attempt's result (`TaskSucceeded` / `TaskFailed`) is recorded twice (a result is
//!   applied at most once, whichever coordinator owned the shard);
//! - the epoch never goes down along the history (a lower epoch after a higher one means a
//!   fenced-out owner committed after the shard had moved on).
//!
//! and across the shard: every run record has a history and every history a run record,
//! ended runs have their final snapshot and no `active` entry, running runs have one, and
//! every run lives in the shard its id hashes to. Across shards: every place a
//! concurrency limit keeps (a slot held, or a place in its queue) belongs to a running
//! run, or a message on its way will free it (a release, or an admission its run's shard
//! answers with one); any other place is a slot lost for good.
//!
//! A record that does not decode (or whose chunks do not join) is counted and described,
//! and the audit goes on with the other records and shards: one damaged record neither
//! hides the rest of the store nor passes unnoticed.
//!
//! [`audit_runs`] also returns what the store says about each run (status, output), so
//! that a harness can compare it with what it expected.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use flowgrid_engine::{Event, RunStatus, RunView, TaskError};
use flowgrid_model::{shard_of, AttemptId, RunId, ShardId};
use flowgrid_store::{chunk_position, join_records, keys, printable_key, Key, ShardStore, Store, StoreLimits, Value};
use flowgrid_store_redb::RedbStore;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::records::{self, EventRecord, GateRecord, OutboxRecord, RunRecord, StartRecord};

/// Problems described in [`AuditReport::problems`]; later ones are only counted.
pub const PROBLEMS_SHOWN_MAX: usize = 20;

/// What an audit found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AuditReport {
    pub shards: u32,
    /// Shard files found and read (a shard never acquired has no file).
    pub shard_files: u32,
    /// Shard files numbered past the shards audited, and not read: the shard count given is
    /// below the grid's, and the runs of those shards went unchecked.
    pub shard_files_beyond: u32,
    /// Shards no coordinator would serve, as their store lost what it held: a listed shard
    /// file gone, a journal deleted by hand, a damaged file or journal (`problems` says which).
    pub shards_not_served: u32,
    pub runs: u64,
    /// Runs still marked active (not ended).
    pub runs_active: u64,
    /// Runs by status name (`running`, `succeeded`, ...).
    pub runs_by_status: BTreeMap<String, u64>,
    /// Runs whose history has a missing sequence number.
    pub history_gaps: u64,
    /// Results (success or failure of one attempt) recorded more than once.
    pub results_double_applied: u64,
    /// History records committed under a lower epoch than an earlier record of the same run.
    pub stale_epoch_commits: u64,
    /// Run records without any history, and histories of runs neither ended (no run
    /// record) nor active.
    pub runs_without_history: u64,
    pub histories_without_run: u64,
    /// Ended runs without their final snapshot.
    pub ended_runs_without_snapshot: u64,
    /// Runs whose `active` index entry disagrees with their status (running without an
    /// entry, ended with one, or an entry without a history).
    pub active_index_mismatches: u64,
    /// Runs stored in a shard other than the one their id hashes to.
    pub runs_misplaced: u64,
    /// Records that did not decode (run records, history records, snapshots, outbox
    /// messages, places of concurrency limits, index entries), or whose chunks did not join.
    pub corrupt_records: u64,
    /// Messages still in the shards' outboxes (child ends, child cancels, announcements):
    /// not a problem by itself (a message taken just before its coordinator stopped is
    /// deleted by the shard's next owner), but one that stays means a receiver never
    /// took it.
    pub outbox_messages_left: u64,
    /// Places concurrency limits keep (slots held, places in queues).
    pub gate_places: u64,
    /// Places kept for a run that ended, with no message on its way to free them.
    pub gate_places_leaked: u64,
    /// Every problem found, of which `problems` describes the first [`PROBLEMS_SHOWN_MAX`].
    pub problems_total: u64,
    /// The first problems found, described for a person.
    pub problems: Vec<String>,
}

impl AuditReport {
    /// True when nothing was found wrong.
    pub fn is_clean(&self) -> bool {
        self.problems_total == 0
    }

    fn problem(&mut self, description: String) {
        self.problems_total += 1;
        if self.problems.len() < PROBLEMS_SHOWN_MAX {
            self.problems.push(description);
        }
    }
}

/// What the store holds about one run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RunFacts {
    pub run_id: RunId,
    /// The shard file it was found in.
    pub shard: u32,
    /// From the run record, else from the start record; empty when neither decodes.
    pub flow: String,
    pub version: u32,
    /// The status of the run record, or `running` for a run in the active index (its
    /// record is written when it ends); `None` for a history that is neither.
    pub status: Option<RunStatus>,
    /// The output of the final snapshot (ended runs that succeeded).
    pub output: Option<Json>,
    /// The error of the final snapshot (failed, cancelled or timed-out runs).
    pub error: Option<TaskError>,
    /// The run record says its final view is rebuilt from its history (no snapshot).
    pub view_in_history: bool,
    /// The run input of the start record.
    pub input: Option<Json>,
    /// History records, the start record included.
    pub history_records: u64,
    /// `TaskSucceeded` and `TaskFailed` records.
    pub results: u64,
    /// Results recorded again for an attempt that already had one.
    pub results_double_applied: u64,
    /// Records committed under a lower epoch than an earlier record.
    pub stale_epoch_commits: u64,
    /// The history's sequence numbers are not 0, 1, 2, ...
    pub history_gap: bool,
    /// Epochs of the first and the last history record.
    pub first_epoch: u64,
    pub last_epoch: u64,
}

/// An audit's report and the facts of every run it read.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    pub report: AuditReport,
    pub runs: BTreeMap<RunId, RunFacts>,
    /// Failure handler starts still in the outboxes, by the run that ended and its round:
    /// the shard's next owner sends them.
    pub handler_starts_left: BTreeSet<(RunId, u32)>,
}

/// Audits the shard files `shard-00000.redb`.. under `data_dir`. Every coordinator using
/// the directory must be stopped (the files are locked while open).
pub async fn audit(data_dir: &Path, shards: u32) -> Result<AuditReport> {
    Ok(audit_runs(data_dir, shards).await?.report)
}

/// Like [`audit`], and returns the facts of every run as well.
pub async fn audit_runs(data_dir: &Path, shards: u32) -> Result<Audit> {
    if shards == 0 {
        return Err(Error::Config("an audit needs the grid's shard count (at least 1)".to_owned()));
    }
    if !data_dir.is_dir() {
        return Err(Error::Config(format!("the data directory {} does not exist", data_dir.display())));
    }
    // Opening a missing shard would create its file: look before opening.
    let store = RedbStore::open(data_dir, StoreLimits::default())?;
    let mut audit = Audit { report: AuditReport { shards, ..AuditReport::default() }, ..Audit::default() };
    let (mut gate_places, mut freeing) = (Vec::new(), Vec::new());
    for (_, extra) in shard_files_from(data_dir, shards) {
        audit.report.shard_files_beyond += 1;
        audit.report.problem(format!(
            "{} is beyond the {shards} shards audited, and was not read: audit with the grid's shard count",
            extra.display()
        ));
    }
    for shard in 0..shards {
        let path = store.shard_path(ShardId(shard));
        if !path.exists() {
            if store.shard_file_listed(ShardId(shard)).map_err(Error::Store)? {
                audit.report.shards_not_served += 1;
                audit.report.problem(format!(
                    "{} is missing, but the data directory held it (its shard-files lists it): the shard's runs are \
                     lost unless the file is restored, and no coordinator serves the shard until then",
                    path.display()
                ));
            }
            continue;
        }
        let file = match store.open_shard(ShardId(shard)).await {
            Ok(file) => file,
            Err(error @ flowgrid_store::Error::Busy { .. }) => {
                return Err(Error::Config(format!(
                    "{} is open in another process ({error}); stop every coordinator using {} before auditing",
                    path.display(),
                    data_dir.display()
                )))
            }
            Err(refused @ flowgrid_store::Error::Corrupt { .. }) => {
                // No coordinator serves this shard either; the other shards are still audited.
                audit.report.shards_not_served += 1;
                audit.report.problem(format!("shard {shard} is not served: {refused}"));
                continue;
            }
            Err(other) => return Err(Error::Store(other)),
        };
        let read = read_shard(shard, &file).await;
        // Release the lock whatever happened; a read error is the one to report.
        let closed = file.close();
        let mut contents = read?;
        closed?;
        audit.report.shard_files += 1;
        audit.report.outbox_messages_left += contents.outbox;
        gate_places.append(&mut contents.gate_places);
        freeing.append(&mut contents.freeing);
        audit.handler_starts_left.append(&mut contents.handler_starts);
        audit_shard(shard, shards, contents, &mut audit);
    }
    audit_gates(gate_places, &freeing, &mut audit);
    Ok(audit)
}

/// Checks that every place a concurrency limit keeps is a running run's, or will be freed
/// by a message on its way.
fn audit_gates(places: Vec<GatePlace>, freeing: &[(RunId, u32)], audit: &mut Audit) {
    let freeing: HashSet<&(RunId, u32)> = freeing.iter().collect();
    audit.report.gate_places = places.len() as u64;
    for GatePlace { shard, flow, key, run_id, round } in places {
        let running = audit.runs.get(&run_id).is_some_and(|facts| facts.status == Some(RunStatus::Running));
        if running || freeing.contains(&(run_id.clone(), round)) {
            continue;
        }
        audit.report.gate_places_leaked += 1;
        audit.report.problem(format!(
            "shard {shard}: flow {flow}'s concurrency limit (key {key:?}) keeps a place for run {run_id} (round \
             {round}), which is not running, and no message on its way frees it"
        ));
    }
}

/// Everything of one shard the audit reads, as stored.
#[derive(Default)]
struct ShardContents {
    runs: Vec<(Key, Value)>,
    active: Vec<Key>,
    /// Joined history records, by run then seq.
    history: Vec<(Key, Value)>,
    /// Joined snapshots, by run.
    snapshots: Vec<(Key, Value)>,
    /// Records in the outbox.
    outbox: u64,
    /// Places kept by the concurrency limits whose gate is in the shard.
    gate_places: Vec<GatePlace>,
    /// Runs (and rounds) whose place a message in the outbox frees: a release, or an
    /// admission the run's shard answers with a release if the run is gone.
    freeing: Vec<(RunId, u32)>,
    /// Failure handler starts in the outbox, by the run that ended and its round.
    handler_starts: BTreeSet<(RunId, u32)>,
    /// Records read but not decoded, described; the rest of the shard was read.
    corrupt: Vec<String>,
}

/// A place a concurrency limit keeps for a run.
struct GatePlace {
    shard: u32,
    flow: String,
    key: String,
    run_id: RunId,
    round: u32,
}

async fn read_shard<S: ShardStore>(shard: u32, file: &S) -> Result<ShardContents> {
    let mut corrupt = Vec::new();
    let runs = file.scan(keys::run_range(), usize::MAX, false).await?;
    let active = file.scan(keys::active_range(), usize::MAX, false).await?.into_iter().map(|(key, _)| key).collect();
    let history = join_each("history", file.scan(keys::history_all_range(), usize::MAX, false).await?, &mut corrupt);
    let snapshots = join_each("snapshot", file.scan(keys::snapshot_range(), usize::MAX, false).await?, &mut corrupt);
    let outbox = join_each("outbox", file.scan(keys::outbox_range(), usize::MAX, false).await?, &mut corrupt);
    let (mut freeing, mut handler_starts) = (Vec::new(), BTreeSet::new());
    for (key, value) in &outbox {
        // A message that does not decode is never sent (its shard logs it): what it was to
        // free stays kept.
        let record = keys::decode_outbox(key)
            .map_err(Error::Store)
            .and_then(|_| records::decode::<OutboxRecord>("outbox message", value));
        match record {
            Ok(OutboxRecord::GateRelease(message) | OutboxRecord::Admit(message)) => {
                freeing.push((message.run_id, message.round));
            }
            Ok(OutboxRecord::StartFailureHandler { failed, round, .. }) => {
                handler_starts.insert((failed, round));
            }
            Ok(_) => {}
            Err(error) => corrupt.push(format!("outbox message {}: {error}", printable_key(key))),
        }
    }
    let mut gate_places = Vec::new();
    for (key, value) in file.scan(keys::gate_range(), usize::MAX, false).await? {
        let place = keys::decode_gate(&key)
            .map_err(Error::Store)
            .and_then(|place| Ok((place, records::decode::<GateRecord>("gate record", &value)?)));
        match place {
            Ok(((flow, key, run_id), record)) => {
                gate_places.push(GatePlace { shard, flow, key, run_id, round: record.round })
            }
            Err(error) => corrupt.push(format!("concurrency limit place {}: {error}", printable_key(&key))),
        }
    }
    let outbox = outbox.len() as u64;
    Ok(ShardContents { runs, active, history, snapshots, outbox, gate_places, freeing, handler_starts, corrupt })
}

/// Joins the chunked records of `pairs`, scanned in key order from one range of kind
/// `what`. A record whose chunks do not join (one missing, a malformed chunk key) is
/// described in `corrupt` and left out; the records around it are still joined.
fn join_each(what: &str, pairs: Vec<(Key, Value)>, corrupt: &mut Vec<String>) -> Vec<(Key, Value)> {
    let later_chunk = |key: &[u8]| chunk_position(key).is_ok_and(|(index, _)| index > 0);
    let mut records = Vec::new();
    let mut pairs = pairs.into_iter().peekable();
    while let Some((key, value)) = pairs.next() {
        let count = match chunk_position(&key) {
            Ok((0, count)) => count,
            Ok((index, count)) => {
                corrupt.push(format!(
                    "{what} chunk {}: chunk {index} of {count} without the chunks before it",
                    printable_key(&key)
                ));
                // The rest of that record's chunks: one problem for the record.
                while pairs.next_if(|(next, _)| later_chunk(next)).is_some() {}
                continue;
            }
            Err(error) => {
                corrupt.push(format!("{what}: {error}"));
                continue;
            }
        };
        // A record's other chunks follow its first, numbered up from it, each with its count.
        let (mut chunks, mut last_index) = (vec![(key, value)], 0);
        while (chunks.len() as u64) < count {
            let Some(Ok((index, of))) = pairs.peek().map(|(next, _)| chunk_position(next)) else { break };
            if of != count || index <= last_index {
                break;
            }
            last_index = index;
            chunks.extend(pairs.next());
        }
        let first = printable_key(&chunks[0].0);
        match join_records(chunks) {
            Ok(mut joined) if joined.len() == 1 => records.extend(joined.pop()),
            Ok(joined) => corrupt.push(format!("{what} {first}: its chunks form {} records, not one", joined.len())),
            Err(error) => corrupt.push(format!("{what}: {error}")),
        }
    }
    records
}

/// One history record, decoded as far as the checks need.
#[derive(Clone, Debug, PartialEq)]
struct HistoryEntry {
    seq: u64,
    epoch: u64,
    /// The attempt a result record reports on.
    result_of: Option<AttemptId>,
}

/// What the checks of one history found.
#[derive(Clone, Debug, Default, PartialEq)]
struct HistoryFindings {
    gap: Option<String>,
    results: u64,
    double_applied: Vec<AttemptId>,
    /// `(seq, epoch, highest earlier epoch)` of each record committed under a lower epoch.
    stale_epochs: Vec<(u64, u64, u64)>,
}

/// Checks one run's history, given in `seq` order.
fn check_history(entries: &[HistoryEntry]) -> HistoryFindings {
    let mut findings = HistoryFindings::default();
    for (expected, entry) in entries.iter().enumerate() {
        if entry.seq != expected as u64 {
            findings.gap = Some(format!("record {} found where record {expected} was expected", entry.seq));
            break;
        }
    }
    let mut seen: HashSet<&AttemptId> = HashSet::new();
    let mut highest_epoch = 0;
    for entry in entries {
        if let Some(attempt) = &entry.result_of {
            findings.results += 1;
            if !seen.insert(attempt) {
                findings.double_applied.push(attempt.clone());
            }
        }
        if entry.epoch < highest_epoch {
            findings.stale_epochs.push((entry.seq, entry.epoch, highest_epoch));
        }
        highest_epoch = highest_epoch.max(entry.epoch);
    }
    findings
}

fn audit_shard(shard: u32, shards: u32, contents: ShardContents, audit: &mut Audit) {
    let Audit { report, runs, .. } = audit;
    for description in &contents.corrupt {
        report.corrupt_records += 1;
        report.problem(format!("shard {shard}: {description}"));
    }
    let mut shard_runs: BTreeMap<RunId, RunFacts> = BTreeMap::new();
    let new_facts = |run_id: &RunId| RunFacts {
        run_id: run_id.clone(),
        shard,
        flow: String::new(),
        version: 0,
        status: None,
        output: None,
        error: None,
        view_in_history: false,
        input: None,
        history_records: 0,
        results: 0,
        results_double_applied: 0,
        stale_epoch_commits: 0,
        history_gap: false,
        first_epoch: 0,
        last_epoch: 0,
    };

    // Run records.
    for (key, value) in &contents.runs {
        let run_id = match keys::decode_run(key) {
            Ok(run_id) => run_id,
            Err(error) => {
                report.corrupt_records += 1;
                report.problem(format!("shard {shard}: {error}"));
                continue;
            }
        };
        let facts = shard_runs.entry(run_id.clone()).or_insert_with(|| new_facts(&run_id));
        match records::decode::<RunRecord>("run record", value) {
            Ok(record) => {
                facts.flow = record.flow;
                facts.version = record.version;
                facts.status = Some(record.status);
                facts.view_in_history = record.view_in_history;
            }
            Err(error) => {
                report.corrupt_records += 1;
                report.problem(format!("shard {shard}, run {run_id}: {error}"));
            }
        }
    }

    // Histories.
    let mut histories: BTreeMap<RunId, Vec<HistoryEntry>> = BTreeMap::new();
    for (key, value) in &contents.history {
        let (run_id, seq) = match keys::decode_history(key) {
            Ok(decoded) => decoded,
            Err(error) => {
                report.corrupt_records += 1;
                report.problem(format!("shard {shard}: {error}"));
                continue;
            }
        };
        let entry = if seq == 0 {
            match records::decode::<StartRecord>("start record", value) {
                Ok(start) => {
                    let facts = shard_runs.entry(run_id.clone()).or_insert_with(|| new_facts(&run_id));
                    if facts.flow.is_empty() {
                        facts.flow = start.flow.into_owned();
                        facts.version = start.version;
                    }
                    facts.input = Some(start.input.into_owned());
                    Some(HistoryEntry { seq, epoch: start.epoch, result_of: None })
                }
                Err(error) => {
                    report.corrupt_records += 1;
                    report.problem(format!("shard {shard}, run {run_id}, history record 0: {error}"));
                    None
                }
            }
        } else {
            match records::decode::<EventRecord>("history record", value) {
                Ok(record) => {
                    let result_of = match record.event {
                        Event::TaskSucceeded { attempt, .. }
                        | Event::TaskCached { attempt, .. }
                        | Event::TaskFailed { attempt, .. } => Some(attempt),
                        _ => None,
                    };
                    Some(HistoryEntry { seq, epoch: record.epoch, result_of })
                }
                Err(error) => {
                    report.corrupt_records += 1;
                    report.problem(format!("shard {shard}, run {run_id}, history record {seq}: {error}"));
                    None
                }
            }
        };
        // An undecodable record still takes its place in the sequence, with the epoch of
        // the record before it (so that it neither hides nor invents a stale epoch).
        let entries = histories.entry(run_id).or_default();
        let entry = entry.unwrap_or_else(|| HistoryEntry {
            seq,
            epoch: entries.last().map(|last| last.epoch).unwrap_or(0),
            result_of: None,
        });
        entries.push(entry);
    }
    for (run_id, entries) in &histories {
        let findings = check_history(entries);
        let facts = shard_runs.entry(run_id.clone()).or_insert_with(|| new_facts(run_id));
        facts.history_records = entries.len() as u64;
        facts.results = findings.results;
        facts.first_epoch = entries.first().map(|entry| entry.epoch).unwrap_or(0);
        facts.last_epoch = entries.last().map(|entry| entry.epoch).unwrap_or(0);
        if let Some(gap) = findings.gap {
            facts.history_gap = true;
            report.history_gaps += 1;
            report.problem(format!("shard {shard}, run {run_id}: history gap: {gap}"));
        }
        for attempt in &findings.double_applied {
            facts.results_double_applied += 1;
            report.results_double_applied += 1;
            report.problem(format!(
                "shard {shard}, run {run_id}: the result of attempt {} of step {}{} is recorded twice",
                attempt.attempt,
                attempt.step,
                attempt.item.map(|item| format!(" item {item}")).unwrap_or_default()
            ));
        }
        for (seq, epoch, highest) in &findings.stale_epochs {
            facts.stale_epoch_commits += 1;
            report.stale_epoch_commits += 1;
            report.problem(format!(
                "shard {shard}, run {run_id}: history record {seq} was committed under epoch {epoch}, \
                 after a record committed under epoch {highest}"
            ));
        }
    }

    // Snapshots: the final view of ended runs.
    let mut snapshotted: HashSet<RunId> = HashSet::new();
    for (key, value) in &contents.snapshots {
        let run_id = match keys::decode_snapshot(key) {
            Ok(run_id) => run_id,
            Err(error) => {
                report.corrupt_records += 1;
                report.problem(format!("shard {shard}: {error}"));
                continue;
            }
        };
        snapshotted.insert(run_id.clone());
        match records::decode::<RunView>("run snapshot", value) {
            Ok(view) => {
                let facts = shard_runs.entry(run_id.clone()).or_insert_with(|| new_facts(&run_id));
                facts.output = view.output;
                facts.error = view.error;
            }
            Err(error) => {
                report.corrupt_records += 1;
                report.problem(format!("shard {shard}, run {run_id}, snapshot: {error}"));
            }
        }
    }

    // The active index.
    let mut active: HashSet<RunId> = HashSet::new();
    for key in &contents.active {
        match keys::decode_active(key) {
            Ok(run_id) => {
                active.insert(run_id);
            }
            Err(error) => {
                report.corrupt_records += 1;
                report.problem(format!("shard {shard}: {error}"));
            }
        }
    }
    // A run gets its run record when it ends: an indexed run without one is running.
    for run_id in &active {
        match shard_runs.get_mut(run_id) {
            Some(facts) if facts.history_records > 0 => {
                facts.status.get_or_insert(RunStatus::Running);
            }
            _ => {
                report.active_index_mismatches += 1;
                report.problem(format!("shard {shard}, run {run_id}: in the active index but has no history"));
            }
        }
    }

    for (run_id, facts) in shard_runs {
        let has_record = facts.status.is_some();
        let has_history = facts.history_records > 0;
        if has_record {
            report.runs += 1;
        }
        if has_record && !has_history {
            report.runs_without_history += 1;
            report.problem(format!("shard {shard}, run {run_id}: a run record without history"));
        }
        if has_history && !has_record {
            report.histories_without_run += 1;
            report.problem(format!(
                "shard {shard}, run {run_id}: a history without a run record, and not in the active index"
            ));
        }
        if let Some(status) = facts.status {
            *report.runs_by_status.entry(status.as_str().to_owned()).or_default() += 1;
            let indexed = active.contains(&run_id);
            if status.is_terminal() {
                if indexed {
                    report.active_index_mismatches += 1;
                    report.problem(format!(
                        "shard {shard}, run {run_id}: ended {} but still in the active index",
                        status.as_str()
                    ));
                }
                if !snapshotted.contains(&run_id) && !facts.view_in_history {
                    report.ended_runs_without_snapshot += 1;
                    report
                        .problem(format!("shard {shard}, run {run_id}: ended {} without a snapshot", status.as_str()));
                }
            } else {
                report.runs_active += 1;
                if !indexed {
                    report.active_index_mismatches += 1;
                    report.problem(format!("shard {shard}, run {run_id}: running but not in the active index"));
                }
            }
        }
        let home = shard_of(run_id.as_str(), shards).0;
        if home != shard {
            report.runs_misplaced += 1;
            report.problem(format!("run {run_id} is stored in shard {shard}, but its id hashes to shard {home}"));
        }
        if let Some(previous) = runs.insert(run_id.clone(), facts) {
            report.problem(format!("run {run_id} is stored in shards {} and {shard}", previous.shard));
        }
    }
}

/// The shard files (`shard-00042.redb`) under `dir` numbered `from` or above, with their
/// numbers, in order.
fn shard_files_from(dir: &Path, from: u32) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter_map(|path| {
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            let number = name.strip_prefix("shard-").and_then(|rest| rest.strip_suffix(".redb"));
            let number = number.and_then(|number| number.parse::<u32>().ok()).filter(|&number| number >= from)?;
            Some((number, path))
        })
        .collect();
    found.sort();
    found
}

/// The highest numbered shard file under `data_dir`, with its number: a grid whose shard
/// count its `grid.json` does not record has at least that number plus one shards.
pub fn last_shard_file(data_dir: &Path) -> Option<(u32, PathBuf)> {
    shard_files_from(data_dir, 0).pop()
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use flowgrid_engine::TimerKey;
    use flowgrid_model::{Epoch, WhenFull};
    use flowgrid_proto::GateMessage;
    use flowgrid_store::WriteBatch;
    use serde_json::json;

    use super::*;

    const SHARDS: u32 = 2;

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let unique = format!(
                "flowgrid-audit-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
            );
            let path = std::env::temp_dir().join(unique);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn attempt(run_id: &RunId, step: &str, number: u32) -> AttemptId {
        AttemptId { run_id: run_id.clone(), step: step.to_owned(), item: None, attempt: number }
    }

    fn succeeded(run_id: &RunId, step: &str, number: u32, epoch: u64) -> EventRecord {
        EventRecord {
            now_ms: 1_000,
            event: Event::TaskSucceeded { attempt: attempt(run_id, step, number), output: json!(number) },
            epoch,
        }
    }

    fn failed(run_id: &RunId, step: &str, number: u32, epoch: u64) -> EventRecord {
        let error = TaskError { code: "boom".into(), message: "boom".into(), retryable: true };
        EventRecord { now_ms: 1_000, event: Event::TaskFailed { attempt: attempt(run_id, step, number), error }, epoch }
    }

    /// A run id that hashes to `shard`.
    fn run_in_shard(shard: u32, name: &str) -> RunId {
        (0..)
            .map(|index| RunId::from_idempotency_key("audit-test", &format!("{name}-{index}")))
            .find(|run_id| shard_of(run_id.as_str(), SHARDS).0 == shard)
            .expect("some key hashes to every shard")
    }

    /// Writes a run as a coordinator would: history records at the given sequence numbers,
    /// then the active entry of a running run, or the run record and snapshot of an ended one.
    fn write_run(
        batch: &mut WriteBatch,
        run_id: &RunId,
        status: RunStatus,
        output: Option<Json>,
        events: &[(u64, EventRecord)],
        start_epoch: u64,
    ) {
        let limits = StoreLimits::default();
        if status.is_terminal() {
            batch.set(keys::run(run_id), records::encode(&run_record(status)));
        }
        let start = StartRecord {
            flow: "f".into(),
            version: 1,
            input: Cow::Owned(json!({"value": 1})),
            now_ms: 1_000,
            epoch: start_epoch,
            parent: None,
            labels: Default::default(),
            queued: false,
            start_at_ms: None,
        };
        batch.set_chunked(&keys::history(run_id, 0), &records::encode(&start), &limits);
        for (seq, event) in events {
            batch.set_chunked(&keys::history(run_id, *seq), &records::encode(event), &limits);
        }
        if status.is_terminal() {
            let view = RunView {
                run_id: run_id.clone(),
                flow: "f".into(),
                version: 1,
                status,
                input: json!({"value": 1}),
                output,
                error: None,
                created_ms: 1_000,
                ended_ms: Some(2_000),
                parent: None,
                redriven: None,
                paused: None,
                queued: None,
                delayed: None,
                on_failure_run: None,
                steps: Vec::new(),
                labels: Default::default(),
                data_left_out: false,
            };
            batch.set_chunked(&keys::snapshot(run_id), &records::encode(&view), &limits);
        } else {
            batch.set(keys::active(run_id), Vec::new());
        }
    }

    fn run_record(status: RunStatus) -> RunRecord {
        RunRecord {
            flow: "f".into(),
            version: 1,
            status,
            created_ms: 1_000,
            ended_ms: status.is_terminal().then_some(2_000),
            view_in_history: false,
        }
    }

    async fn commit(dir: &Path, shard: u32, batch: WriteBatch) {
        let store = RedbStore::open(dir, StoreLimits::default()).unwrap();
        let file = store.open_shard(ShardId(shard)).await.unwrap();
        let mut epoch = file.acquire().await.unwrap();
        while epoch < Epoch(3) {
            epoch = file.acquire().await.unwrap();
        }
        file.commit(epoch, batch).await.unwrap();
        file.close().unwrap();
    }

    #[tokio::test]
    async fn crafted_histories_are_counted() {
        let dir = TempDir::new("crafted");
        let clean = run_in_shard(0, "clean");
        let double = run_in_shard(0, "double");
        let gap = run_in_shard(1, "gap");
        let stale = run_in_shard(1, "stale");
        let running = run_in_shard(1, "running");
        let running_with_record = run_in_shard(1, "running-with-record");

        let mut batch = WriteBatch::new();
        let clean_events = [
            (1, succeeded(&clean, "s1", 1, 2)),
            (2, failed(&clean, "s2", 1, 2)),
            (3, EventRecord { now_ms: 1_500, event: Event::TimerFired { timer: TimerKey::RunTimeout }, epoch: 3 }),
            (4, succeeded(&clean, "s2", 2, 3)),
        ];
        write_run(&mut batch, &clean, RunStatus::Succeeded, Some(json!({"value": 8})), &clean_events, 2);
        // The same attempt's result twice (once as a success, once as a failure), and
        // another attempt's result twice.
        let double_events = [
            (1, succeeded(&double, "s1", 1, 1)),
            (2, failed(&double, "s1", 1, 2)),
            (3, succeeded(&double, "s2", 1, 2)),
            (4, succeeded(&double, "s2", 1, 2)),
        ];
        write_run(&mut batch, &double, RunStatus::Succeeded, Some(json!(4)), &double_events, 1);
        commit(&dir.0, 0, batch).await;

        let mut batch = WriteBatch::new();
        // Record 2 is missing.
        let gap_events = [(1, succeeded(&gap, "s1", 1, 1)), (3, succeeded(&gap, "s2", 1, 1))];
        write_run(&mut batch, &gap, RunStatus::Failed, None, &gap_events, 1);
        // The epoch goes 1, 3, 2, 3, 1: two records under a lower epoch than an earlier one.
        let stale_events = [
            (1, succeeded(&stale, "s1", 1, 3)),
            (2, succeeded(&stale, "s2", 1, 2)),
            (3, succeeded(&stale, "s3", 1, 3)),
            (4, succeeded(&stale, "s4", 1, 1)),
        ];
        write_run(&mut batch, &stale, RunStatus::Succeeded, Some(json!(16)), &stale_events, 1);
        write_run(&mut batch, &running, RunStatus::Running, None, &[(1, succeeded(&running, "s1", 1, 1))], 1);
        // Versions before ADR 0009 also wrote a run record when a run started.
        write_run(&mut batch, &running_with_record, RunStatus::Running, None, &[], 1);
        batch.set(keys::run(&running_with_record), records::encode(&run_record(RunStatus::Running)));
        commit(&dir.0, 1, batch).await;

        let found = audit_runs(&dir.0, SHARDS).await.unwrap();
        let report = &found.report;
        assert_eq!(report.shard_files, 2);
        assert_eq!(report.runs, 6, "{report:#?}");
        assert_eq!(report.runs_active, 2, "{report:#?}");
        assert_eq!(report.runs_by_status.get("succeeded"), Some(&3));
        assert_eq!(report.runs_by_status.get("failed"), Some(&1));
        assert_eq!(report.runs_by_status.get("running"), Some(&2));
        assert_eq!(report.history_gaps, 1, "{report:#?}");
        assert_eq!(report.results_double_applied, 2, "{report:#?}");
        assert_eq!(report.stale_epoch_commits, 2, "{report:#?}");
        assert_eq!(report.runs_misplaced, 0, "{report:#?}");
        assert_eq!(report.active_index_mismatches, 0, "{report:#?}");
        assert_eq!(report.ended_runs_without_snapshot, 0, "{report:#?}");
        assert_eq!(report.problems_total, 5, "{report:#?}");
        assert_eq!(report.problems.len(), 5);
        assert!(report.problems.iter().any(|problem| problem.contains(gap.as_str()) && problem.contains("gap")));
        assert!(report.problems.iter().any(|problem| problem.contains(stale.as_str()) && problem.contains("epoch 1")));

        let facts = &found.runs[&clean];
        assert_eq!(facts.status, Some(RunStatus::Succeeded));
        assert_eq!(facts.output, Some(json!({"value": 8})));
        assert_eq!(facts.input, Some(json!({"value": 1})));
        assert_eq!((facts.history_records, facts.results), (5, 3));
        assert_eq!((facts.first_epoch, facts.last_epoch), (2, 3));
        assert_eq!((facts.results_double_applied, facts.stale_epoch_commits, facts.history_gap), (0, 0, false));
        assert_eq!(found.runs[&double].results_double_applied, 2);
        assert!(found.runs[&gap].history_gap);
        assert_eq!(found.runs[&stale].stale_epoch_commits, 2);
        assert_eq!(found.runs[&running].status, Some(RunStatus::Running));
        assert_eq!(found.runs[&running].output, None);

        let report_only = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!(report_only.results_double_applied, 2);
    }

    #[tokio::test]
    async fn shard_files_past_the_shards_audited_are_counted_unread() {
        let dir = TempDir::new("beyond");
        commit(&dir.0, 0, WriteBatch::new()).await;
        commit(&dir.0, SHARDS + 3, WriteBatch::new()).await;
        std::fs::write(dir.0.join("shard-notes.redb"), b"not a shard file").unwrap();

        let report = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!((report.shard_files, report.shard_files_beyond), (1, 1), "{report:#?}");
        assert!(report.problems.iter().any(|problem| problem.contains("was not read")), "{report:#?}");
        assert!(!report.is_clean());
        let (number, path) = last_shard_file(&dir.0).expect("a shard file");
        assert_eq!(number, SHARDS + 3);
        assert!(path.ends_with(format!("shard-{:05}.redb", SHARDS + 3)), "{}", path.display());
        assert_eq!(audit(&dir.0, SHARDS + 4).await.unwrap().shard_files_beyond, 0);
    }

    #[tokio::test]
    async fn index_and_placement_problems_are_counted() {
        let dir = TempDir::new("index");
        let misplaced = run_in_shard(1, "misplaced");
        let ended_active = run_in_shard(0, "ended-active");
        let orphan_history = run_in_shard(0, "orphan");
        let indexed_only = run_in_shard(0, "indexed-only");
        let mut batch = WriteBatch::new();
        write_run(&mut batch, &misplaced, RunStatus::Succeeded, Some(json!(1)), &[], 1);
        write_run(&mut batch, &ended_active, RunStatus::Succeeded, Some(json!(1)), &[], 1);
        batch.set(keys::active(&ended_active), Vec::new());
        batch.set(keys::active(&indexed_only), Vec::new());
        let start = StartRecord {
            flow: "f".into(),
            version: 1,
            input: Cow::Owned(json!(1)),
            now_ms: 1,
            epoch: 1,
            parent: None,
            labels: Default::default(),
            queued: false,
            start_at_ms: None,
        };
        batch.set_chunked(&keys::history(&orphan_history, 0), &records::encode(&start), &StoreLimits::default());
        let cancel = records::OutboxRecord::CancelChild { child: run_in_shard(0, "child"), reason: "test".into() };
        batch.set_chunked(&cancel.key(), &records::encode(&cancel), &StoreLimits::default());
        commit(&dir.0, 0, batch).await;

        let found = audit_runs(&dir.0, SHARDS).await.unwrap();
        let report = &found.report;
        assert_eq!(report.shard_files, 1);
        assert_eq!(report.outbox_messages_left, 1, "{report:#?}");
        assert_eq!(report.runs, 2, "{report:#?}");
        assert_eq!(report.runs_misplaced, 1, "{report:#?}");
        assert_eq!(report.active_index_mismatches, 2, "{report:#?}");
        assert!(report
            .problems
            .iter()
            .any(|problem| problem.contains(indexed_only.as_str()) && problem.contains("no history")));
        assert_eq!(report.histories_without_run, 1, "{report:#?}");
        assert_eq!(found.runs[&orphan_history].status, None);
        assert!(!report.is_clean());
    }

    #[tokio::test]
    async fn a_concurrency_slot_kept_for_an_ended_run_with_nothing_to_free_it_is_lost() {
        let dir = TempDir::new("gates");
        let (running, freed, admitted, lost) = (
            run_in_shard(0, "running"),
            run_in_shard(0, "freed"),
            run_in_shard(0, "admitted"),
            run_in_shard(0, "lost"),
        );
        let mut batch = WriteBatch::new();
        write_run(&mut batch, &running, RunStatus::Running, None, &[], 1);
        for ended in [&freed, &admitted, &lost] {
            write_run(&mut batch, ended, RunStatus::Succeeded, Some(json!(1)), &[], 1);
        }
        let place = GateRecord {
            round: 2,
            admitted: true,
            since_ms: 1,
            seq: None,
            max: 4,
            rate: None,
            when_full: WhenFull::Queue,
            version: 1,
            cancelling: false,
        };
        for run_id in [&running, &freed, &admitted, &lost] {
            batch.set(keys::gate("f", "acme", run_id), records::encode(&place));
        }
        let message = |run_id: &RunId, round| GateMessage {
            flow: "f".into(),
            key: "acme".into(),
            run_id: run_id.clone(),
            round,
            max: 0,
            rate: None,
            when_full: WhenFull::Queue,
            version: 1,
        };
        // A release of the round held frees its place; an admission its run's shard answers
        // with one; a release of another round frees nothing.
        for record in [
            OutboxRecord::GateRelease(message(&freed, 2)),
            OutboxRecord::Admit(message(&admitted, 2)),
            OutboxRecord::GateRelease(message(&lost, 1)),
        ] {
            batch.set_chunked(&record.key(), &records::encode(&record), &StoreLimits::default());
        }
        commit(&dir.0, 0, batch).await;

        let report = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!((report.gate_places, report.gate_places_leaked), (4, 1), "{report:#?}");
        assert_eq!(report.problems_total, 1, "{report:#?}");
        assert!(report.problems[0].contains(&format!("run {lost} (round 2)")), "{report:#?}");
    }

    #[tokio::test]
    async fn an_outbox_message_that_does_not_decode_is_a_corrupt_record() {
        let dir = TempDir::new("outbox-garbage");
        let mut batch = WriteBatch::new();
        // A release that would free a place, garbled: 0xc1 starts no MessagePack value.
        let key = keys::outbox(&run_in_shard(0, "garbled"), &format!("{}.2", records::OUTBOX_GATE_RELEASE));
        batch.set_chunked(&key, b"\xc1 garbled", &StoreLimits::default());
        commit(&dir.0, 0, batch).await;

        let report = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!((report.outbox_messages_left, report.corrupt_records), (1, 1), "{report:#?}");
        assert!(!report.is_clean(), "{report:#?}");
        assert!(report.problems[0].starts_with("shard 0: outbox message "), "{report:#?}");
    }

    #[tokio::test]
    async fn a_place_of_a_concurrency_limit_that_does_not_decode_is_reported_and_the_other_shards_audited() {
        let dir = TempDir::new("bad-place");
        let (held, elsewhere) = (run_in_shard(0, "held"), run_in_shard(1, "elsewhere"));
        let mut batch = WriteBatch::new();
        write_run(&mut batch, &held, RunStatus::Running, None, &[], 1);
        batch.set(keys::gate("f", "acme", &held), b"\xc1".to_vec());
        commit(&dir.0, 0, batch).await;
        let mut batch = WriteBatch::new();
        write_run(&mut batch, &elsewhere, RunStatus::Succeeded, Some(json!(1)), &[], 1);
        commit(&dir.0, 1, batch).await;

        let report = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!((report.shard_files, report.runs), (2, 2), "{report:#?}");
        assert_eq!((report.corrupt_records, report.problems_total), (1, 1), "{report:#?}");
        assert!(report.problems[0].starts_with("shard 0: concurrency limit place "), "{report:#?}");
    }

    #[tokio::test]
    async fn a_torn_record_is_reported_and_the_records_and_shards_after_it_audited() {
        let dir = TempDir::new("torn");
        let (torn, other, elsewhere) =
            (run_in_shard(0, "torn"), run_in_shard(0, "other"), run_in_shard(1, "elsewhere"));
        let limits = StoreLimits::default();
        let mut batch = WriteBatch::new();
        for run_id in [&torn, &other] {
            write_run(&mut batch, run_id, RunStatus::Succeeded, Some(json!(1)), &[], 1);
        }
        // A history record of three chunks, whose middle chunk goes missing below.
        batch.set_chunked(&keys::history(&torn, 1), &vec![b'x'; 2 * limits.value_bytes_max + 1], &limits);
        commit(&dir.0, 0, batch).await;
        let mut batch = WriteBatch::new();
        write_run(&mut batch, &elsewhere, RunStatus::Succeeded, Some(json!(1)), &[], 1);
        commit(&dir.0, 1, batch).await;
        let store = RedbStore::open(&dir.0, limits).unwrap();
        let file = store.open_shard(ShardId(0)).await.unwrap();
        let epoch = file.acquire().await.unwrap();
        let chunks = file.scan(keys::chunks_range(&keys::history(&torn, 1)), usize::MAX, false).await.unwrap();
        assert_eq!(chunks.len(), 3);
        let mut batch = WriteBatch::new();
        batch.clear(chunks[1].0.clone());
        file.commit(epoch, batch).await.unwrap();
        file.close().unwrap();
        drop(store);

        let found = audit_runs(&dir.0, SHARDS).await.unwrap();
        let report = &found.report;
        assert_eq!((report.shard_files, report.runs), (2, 3), "{report:#?}");
        assert_eq!((report.corrupt_records, report.problems_total), (1, 1), "{report:#?}");
        assert!(report.problems[0].starts_with("shard 0: history: "), "{report:#?}");
        assert_eq!(found.runs[&torn].history_records, 1, "the start record, read past the torn one");
        assert_eq!(found.runs[&other].history_records, 1);
        assert_eq!(found.runs[&elsewhere].history_records, 1);
    }

    #[test]
    fn chunks_that_do_not_join_are_described_and_the_records_around_them_joined() {
        let limits = StoreLimits::default();
        let record = |seq: u64, bytes: usize| {
            let mut batch = WriteBatch::new();
            batch.set_chunked(&keys::history(&RunId("r".into()), seq), &vec![b'x'; bytes], &limits);
            let mut chunks: Vec<(Key, Value)> = batch
                .into_mutations()
                .into_iter()
                .filter_map(|mutation| match mutation {
                    flowgrid_store::Mutation::Set(key, value) => Some((key, value)),
                    _ => None,
                })
                .collect();
            chunks.sort();
            chunks
        };
        let three_chunks = 2 * limits.value_bytes_max + 1;
        let mut pairs = record(0, 8);
        let mut torn = record(1, three_chunks);
        torn.remove(1);
        pairs.extend(torn);
        let mut headless = record(2, three_chunks);
        headless.remove(0);
        pairs.extend(headless);
        pairs.extend(record(3, three_chunks));
        pairs.push((b"not a chunk".to_vec(), Vec::new()));
        pairs.extend(record(4, 8));

        let mut corrupt = Vec::new();
        let joined = join_each("history", pairs, &mut corrupt);
        let seqs: Vec<u64> = joined.iter().map(|(key, _)| keys::decode_history(key).unwrap().1).collect();
        assert_eq!(seqs, [0, 3, 4], "{corrupt:#?}");
        assert_eq!(joined[1].1.len(), three_chunks);
        assert_eq!(corrupt.len(), 3, "one problem per record: {corrupt:#?}");
        assert!(corrupt[1].contains("chunk 1 of 3 without the chunks before it"), "{corrupt:#?}");
    }

    #[tokio::test]
    async fn a_shard_held_open_is_reported_with_its_file() {
        let dir = TempDir::new("busy");
        let store = RedbStore::open(&dir.0, StoreLimits::default()).unwrap();
        let held = store.open_shard(ShardId(1)).await.unwrap();
        let error = audit(&dir.0, SHARDS).await.unwrap_err().to_string();
        assert!(error.contains("shard-00001.redb"), "{error}");
        assert!(error.contains("stop every coordinator"), "{error}");
        held.close().unwrap();
        let report = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!((report.shard_files, report.runs), (1, 0));
        assert!(report.is_clean(), "{report:#?}");
    }

    #[tokio::test]
    async fn a_shard_file_gone_missing_is_reported() {
        let dir = TempDir::new("gone");
        commit(&dir.0, 1, WriteBatch::new()).await;
        assert!(audit(&dir.0, SHARDS).await.unwrap().is_clean());
        std::fs::remove_file(dir.0.join("shard-00001.redb")).unwrap();
        let report = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!((report.shard_files, report.shards_not_served, report.problems_total), (0, 1, 1), "{report:#?}");
        assert!(report.problems[0].contains("shard-00001.redb is missing"), "{report:#?}");
    }

    #[tokio::test]
    async fn a_shard_whose_journal_was_deleted_by_hand_is_reported_and_the_others_audited() {
        let dir = TempDir::new("journal-gone");
        commit(&dir.0, 0, WriteBatch::new()).await;
        // What a crash and a deleted journal leave: the shard file names a writer whose
        // mark says its journal held commits, and the journal is gone.
        let store = RedbStore::open(&dir.0, StoreLimits::default()).unwrap();
        let file = store.open_shard(ShardId(1)).await.unwrap();
        let epoch = file.acquire().await.unwrap();
        let run = run_in_shard(1, "journaled");
        let mut batch = WriteBatch::new();
        batch.set(keys::active(&run), Vec::new());
        batch.clear(keys::active(&run));
        file.commit(epoch, batch).await.unwrap();
        let writer = std::fs::read_dir(dir.0.join("journal")).unwrap().next().unwrap().unwrap().file_name();
        file.close().unwrap();
        drop(store);
        std::fs::create_dir_all(dir.0.join("journal-writers")).unwrap();
        std::fs::write(dir.0.join("journal-writers").join(&writer), b"").unwrap();
        let report = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!((report.shard_files, report.shards_not_served, report.problems_total), (1, 1, 1), "{report:#?}");
        assert!(report.problems[0].starts_with("shard 1 is not served: "), "{report:#?}");
        assert!(report.problems[0].contains("which is gone"), "{report:#?}");
    }

    #[tokio::test]
    async fn a_missing_directory_or_extra_shard_files_are_reported() {
        let dir = TempDir::new("extra");
        let missing = dir.0.join("nothing-here");
        assert!(audit(&missing, SHARDS).await.unwrap_err().to_string().contains("does not exist"));
        commit(&dir.0, 3, WriteBatch::new()).await;
        let report = audit(&dir.0, SHARDS).await.unwrap();
        assert_eq!(report.shard_files, 0);
        assert_eq!(report.problems_total, 1, "{report:#?}");
        assert!(report.problems[0].contains("shard-00003.redb"), "{report:#?}");
    }

    #[test]
    fn history_checks_on_their_own() {
        let run_id = RunId("r".into());
        let entry = |seq, epoch, result: Option<u32>| HistoryEntry {
            seq,
            epoch,
            result_of: result.map(|number| attempt(&run_id, "s", number)),
        };
        assert_eq!(check_history(&[]), HistoryFindings::default());
        let clean = check_history(&[entry(0, 1, None), entry(1, 1, Some(1)), entry(2, 2, Some(2))]);
        assert_eq!((clean.gap, clean.results, clean.double_applied.len(), clean.stale_epochs.len()), (None, 2, 0, 0));
        let no_start = check_history(&[entry(1, 1, None)]);
        assert!(no_start.gap.is_some());
        let down = check_history(&[entry(0, 5, None), entry(1, 4, Some(1)), entry(2, 5, Some(1))]);
        assert_eq!(down.stale_epochs, vec![(1, 4, 5)]);
        assert_eq!(down.double_applied, vec![attempt(&run_id, "s", 1)]);
    }
}
