//! The worker's record in the workers bucket: which pool it serves, how busy it is. Kept
//! while the worker runs, rewritten every [`WorkerRecord::HEARTBEAT_MS`] and within a
//! second of a change in the tasks it runs, deleted when it stops: once the tasks it held
//! when the stop was asked for are done or handed back, so that a worker in its shutdown
//! grace is still listed with them. The bucket drops the record of a worker that died.
//! Best effort: a worker that cannot write it (no bucket and no permission to make one)
//! serves its pool all the same.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use flowgrid_proto::{encode, Encoding, Subjects, WorkerRecord};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{now_ms, Shared};
use crate::broker;

/// How often the worker looks whether its record needs writing.
const LOOK_EVERY_MS: u64 = 1_000;
const LOOK_EVERY: Duration = Duration::from_millis(LOOK_EVERY_MS);

/// What the record says about the worker besides its counters.
pub(super) struct Identity {
    pub(super) pool: String,
    pub(super) concurrency: usize,
}

/// Writes the worker's record until `stopped` (the worker is done with its tasks), then
/// deletes it.
pub(super) async fn keep_registered(
    jetstream: jetstream::Context,
    subjects: Subjects,
    identity: Identity,
    shared: Arc<Shared>,
    stopped: CancellationToken,
) {
    let bucket = match jetstream.get_key_value(subjects.workers_bucket()).await {
        Ok(bucket) => bucket,
        Err(_) => match broker::workers_kv(&jetstream, &subjects).await {
            Ok(bucket) => bucket,
            Err(error) => {
                warn!(pool = %identity.pool, error = %error, "cannot open the workers bucket; this worker is not listed by `flowgrid workers`");
                return;
            }
        },
    };
    let host = crate::host_name();
    let salt = uuid::Uuid::new_v4().as_u128() as u16;
    let mut record = WorkerRecord {
        id: format!("{}.{host}-{}-{salt:04x}", identity.pool, std::process::id()),
        pool: identity.pool,
        host,
        pid: std::process::id(),
        concurrency: u32::try_from(identity.concurrency).unwrap_or(u32::MAX),
        running: 0,
        tasks_done: 0,
        started_ms: now_ms(),
        heartbeat_ms: 0,
        sdk: concat!("flowgrid-sdk ", env!("CARGO_PKG_VERSION")).to_owned(),
    };
    let mut warned = false;
    let mut look = tokio::time::interval(LOOK_EVERY);
    let mut written_ms = 0;
    loop {
        tokio::select! {
            _ = stopped.cancelled() => break,
            _ = look.tick() => {}
        }
        // Rewritten when its heartbeat is due, or sooner when the tasks it runs changed
        // (`flowgrid workers` and `status` show how busy it is, not how busy it was).
        let running = u32::try_from(shared.running.count()).unwrap_or(u32::MAX);
        let now = now_ms();
        if running == record.running && now.saturating_sub(written_ms) + LOOK_EVERY_MS / 2 < WorkerRecord::HEARTBEAT_MS
        {
            continue;
        }
        record.running = running;
        record.tasks_done = shared.tasks_done.load(Ordering::Relaxed);
        record.heartbeat_ms = now;
        written_ms = now;
        if let Err(error) = put(&bucket, &record).await {
            if !std::mem::replace(&mut warned, true) {
                warn!(pool = %record.pool, error = %error, "cannot write this worker's record in the workers bucket");
            }
        }
    }
    if let Err(error) = bucket.delete(&record.id).await {
        debug!(pool = %record.pool, error = %error, "cannot delete this worker's record; it expires");
    }
}

async fn put(bucket: &kv::Store, record: &WorkerRecord) -> Result<(), async_nats::Error> {
    let value = encode(Encoding::MsgPack, record)?;
    bucket.put(&record.id, value.into()).await?;
    Ok(())
}
