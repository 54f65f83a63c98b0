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
    let mut more = stored.more;
    for (key, value) in &stored.records {
        let (_, seq) = keys::decode_history(key).map_err(internal)?;
        match history_record(seq, value) {
            Ok(record) => page.push(record),
            // The records before it are read, and the page ends there: the next page begins
            // with it and says which it is, so a reader can step past it.
            Err(_) if !page.is_empty() => {
                more = true;
                break;
            }
            Err(error) => return Err(undecodable(&run_id, seq, &error)),
        }
    }
    let next = if more { page.last().map(|record| record.seq) } else { None };
    Ok(RunHistory { run_id, records: page, next })
}

/// What a reader is told when record `seq` of `run_id`'s history does not decode (a run
/// held back for it is the one an operator reads): which record, and how to read on.
fn undecodable(run_id: &RunId, seq: u64, error: &crate::error::Error) -> ApiError {
    internal(format_args!(
        "history record {seq} of run {run_id} does not decode ({error}); read the records after it \
         with after={seq} (`flowgrid run history {run_id} --after {seq}`)"
    ))
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use flowgrid_engine::Event;
    use flowgrid_model::AttemptId;
    use flowgrid_proto::ErrorCode;
    use flowgrid_store::{StoreLimits, WriteBatch};
    use serde_json::json;

    use crate::shard::testing::{test_shard, TestShard};

    use super::*;

    /// A record that does not decode ends the page before it, and the page after names it
    /// and how to step past it, so the records after it can still be read.
    #[tokio::test]
    async fn paging_reads_past_a_record_that_does_not_decode() {
        let TestShard { _dir, file, epoch } = test_shard().await;
        let limits = StoreLimits::default();
        let run_id = RunId::from_idempotency_key("held", "k");
        let start = StartRecord {
            flow: "held".into(),
            version: 1,
            input: Cow::Owned(json!({})),
            now_ms: 1,
            epoch: epoch.0,
            parent: None,
            labels: None,
            queued: false,
            start_at_ms: None,
        };
        let attempt = AttemptId { run_id: run_id.clone(), step: "a".into(), item: None, attempt: 1 };
        let event = |seq: u64| EventRecord {
            now_ms: 1 + seq,
            event: Event::TaskProgress { attempt: attempt.clone(), details: json!({ "seq": seq }) },
            epoch: epoch.0,
        };
        let mut batch = WriteBatch::new();
        batch.insert_chunked(&keys::history(&run_id, 0), &records::encode(&start), &limits);
        batch.insert_chunked(&keys::history(&run_id, 1), &records::encode(&event(1)), &limits);
        // 0xc1 is a byte MessagePack never uses.
        batch.insert_chunked(&keys::history(&run_id, 2), &[0xc1], &limits);
        batch.insert_chunked(&keys::history(&run_id, 3), &records::encode(&event(3)), &limits);
        file.commit(epoch, batch).await.unwrap();
        let seqs = |page: &RunHistory| page.records.iter().map(|record| record.seq).collect::<Vec<_>>();

        let first = history_page(&file, run_id.clone(), None, PAGE_RECORDS_MAX).await.unwrap();
        assert_eq!((seqs(&first), first.next), (vec![0, 1], Some(1)), "the page ends before the bad record");

        let error = history_page(&file, run_id.clone(), Some(1), PAGE_RECORDS_MAX).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(error.message.contains("history record 2 of run"), "names the record: {}", error.message);
        assert!(error.message.contains(run_id.as_str()), "names the run: {}", error.message);
        assert!(error.message.contains("--after 2"), "says how to read on: {}", error.message);

        let rest = history_page(&file, run_id.clone(), Some(2), PAGE_RECORDS_MAX).await.unwrap();
        assert_eq!((seqs(&rest), rest.next), (vec![3], None), "the records after it are read");
    }
}
