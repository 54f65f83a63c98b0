//! A run's history as the API shows it: the records its shard committed (its start, then
//! every event it accepted), read a page at a time.
//!
//! The read goes to the store beside the actor: it sees what is committed, and a long
//! history (a map of 10,000 items has over 20,000 records) does not hold the shard's
//! batch. A page scans only its own records, so reading a long history page by page costs
//! what the history holds.

use std::sync::Arc;

use flowgrid_model::RunId;
use flowgrid_proto::{ApiError, HistoryRecord, HistoryStart, RunHistory};
use flowgrid_store::{keys, KeyRange, RecordPage, ShardStore};

use super::actor::ShardActor;
use super::runs::{internal, not_found, read_failure};
use super::Responder;
use crate::records::{self, EventRecord, StartRecord};

/// Records in one page at most, and what a request gets without a limit.
pub const PAGE_RECORDS_MAX: usize = 1_000;
/// Bytes of records (as stored) past which a page ends early, so a reply stays well under
/// NATS's payload limit.
const PAGE_BYTES_MAX: usize = 512 * 1024;

impl<S: ShardStore> ShardActor<S> {
    /// Answers with up to `limit` records of `run_id`'s history after `after`.
    pub(super) fn read_history(&self, run_id: RunId, after: Option<u64>, limit: usize, reply: Responder<RunHistory>) {
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            // The caller may have given up waiting.
            let _ = reply.send(history_page(&*store, run_id, after, limit).await);
        });
    }
}

pub(super) async fn history_page<S: ShardStore>(
    store: &S,
    run_id: RunId,
    after: Option<u64>,
    limit: usize,
) -> Result<RunHistory, ApiError> {
    let whole = keys::history_range(&run_id);
    let begin = match after {
        None => Some(whole.begin.clone()),
        Some(after) => after.checked_add(1).map(|first| keys::history(&run_id, first)),
    };
    let stored = match begin {
        Some(begin) => store
            .scan_records(KeyRange { begin, end: whole.end.clone() }, limit, PAGE_BYTES_MAX)
            .await
            .map_err(read_failure)?,
        None => RecordPage::default(),
    };
    // Nothing after `after` is an empty page of a run that has records up to there, and
    // `not_found` for a run that never started or was deleted: every run has its start.
    if stored.records.is_empty() && (after.is_none() || !has_history(store, whole).await?) {
        return Err(not_found(&run_id));
    }
    let mut page = Vec::with_capacity(stored.records.len());
    for (key, value) in &stored.records {
        let (_, seq) = keys::decode_history(key).map_err(internal)?;
        page.push(history_record(seq, value).map_err(internal)?);
    }
    let next = if stored.more { page.last().map(|record| record.seq) } else { None };
    Ok(RunHistory { run_id, records: page, next })
}

/// Whether the run whose history is `whole` has any record (its start, at least).
async fn has_history<S: ShardStore>(store: &S, whole: KeyRange) -> Result<bool, ApiError> {
    Ok(!store.scan(whole, 1, false).await.map_err(read_failure)?.is_empty())
}

fn history_record(seq: u64, value: &[u8]) -> crate::error::Result<HistoryRecord> {
    if seq == 0 {
        let start: StartRecord = records::decode("history start record", value)?;
        let started = HistoryStart {
            flow: start.flow.into_owned(),
            version: start.version,
            input: start.input.into_owned(),
            parent: start.parent.map(|parent| parent.into_owned()),
            labels: start.labels.map(|labels| labels.into_owned()).unwrap_or_default(),
            queued: start.queued,
            start_at_ms: start.start_at_ms,
        };
        return Ok(HistoryRecord { seq, at_ms: start.now_ms, started: Some(started), event: None });
    }
    let record: EventRecord = records::decode("history record", value)?;
    Ok(HistoryRecord { seq, at_ms: record.now_ms, started: None, event: Some(record.event) })
}
