//! This coordinator's record in the members bucket: written when it joins, rewritten
//! every heartbeat (compare-and-set on its last revision), deleted when it leaves.
//! Every confirmed write renews the [`Lease`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
use async_nats::jetstream::{kv, ErrorCode};
use bytes::Bytes;
use flowgrid_proto::MemberRecord;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Lease;
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::metrics;
use crate::routing::ShardTable;

/// Heartbeats per lease: a member may miss a few before its lease runs out.
const HEARTBEATS_PER_LEASE: u32 = 5;
/// Shortest wait for one heartbeat write, however short the lease (it waits for as long as
/// the lease it would renew lasts).
const HEARTBEAT_WRITE_WAIT_MIN: Duration = Duration::from_millis(100);

/// What NATS says of the members bucket this member joined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bucket {
    /// The same bucket: its stream was read, made when the one joined was.
    Same,
    /// Gone: its stream is not found, or was made again since (another grid's state).
    Gone,
    /// Not known: the stream could not be read (a timeout, no responders while JetStream
    /// elects a leader). Nothing may be written on the strength of it: asked again later.
    Unknown,
}

/// Judges a read of the members bucket's stream (`Ok`: when it was made, Unix ns) against
/// the bucket this member joined, made at `joined_created_ns`.
fn judge_bucket(read: Result<i128, &GetStreamError>, joined_created_ns: i128) -> Bucket {
    match read {
        Ok(created_ns) if created_ns == joined_created_ns => Bucket::Same,
        Ok(_) => Bucket::Gone,
        Err(error) => match error.kind() {
            GetStreamErrorKind::JetStream(source) if source.error_code() == ErrorCode::STREAM_NOT_FOUND => Bucket::Gone,
            _ => Bucket::Unknown,
        },
    }
}

pub struct Membership {
    kv: kv::Store,
    jetstream: async_nats::jetstream::Context,
    /// Cancelled when the members bucket is gone from NATS (its store was lost or
    /// deleted): the coordinator leaves and joins the grid again, making it anew.
    lost: CancellationToken,
    /// When the members bucket this member joined was made (Unix ns): a bucket made since
    /// is another grid's state (another coordinator made it anew after NATS lost its
    /// store), however this member's record got into it.
    bucket_created_ns: i128,
    lease: Arc<Lease>,
    table: Arc<ShardTable>,
    draining: AtomicBool,
    /// Not watching the buckets yet; true until the shard manager says otherwise.
    catching_up: AtomicBool,
    /// Asks the heartbeat loop to write the record now rather than at its next tick.
    beat_now: Notify,
    /// The record and the revision it was last written at (`None`: not written yet).
    state: Mutex<(MemberRecord, Option<u64>)>,
}

impl Membership {
    /// The membership of `record` in the members bucket `kv`, as it is now.
    pub async fn join(
        kv: kv::Store,
        jetstream: async_nats::jetstream::Context,
        record: MemberRecord,
        lease: Arc<Lease>,
        table: Arc<ShardTable>,
    ) -> Result<Membership> {
        let bucket = jetstream
            .get_stream(&kv.stream_name)
            .await
            .map_err(|source| Error::Nats { what: "read the members bucket", source: Box::new(source) })?;
        let bucket_created_ns = bucket.cached_info().created.unix_timestamp_nanos();
        Ok(Membership {
            kv,
            jetstream,
            lost: CancellationToken::new(),
            bucket_created_ns,
            lease,
            table,
            draining: AtomicBool::new(false),
            catching_up: AtomicBool::new(true),
            beat_now: Notify::new(),
            state: Mutex::new((record, None)),
        })
    }

    /// Writes the record once; a success renews the lease.
    pub async fn beat(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        let (record, revision) = &mut *state;
        record.heartbeat_ms = now_ms();
        record.shards_serving = self.table.served();
        record.draining = self.draining.load(Ordering::Acquire);
        record.catching_up = self.catching_up.load(Ordering::Acquire);
        let value = Bytes::from(rmp_serde::to_vec_named(record).expect("a member record encodes"));
        let sent = Instant::now();
        let written = match *revision {
            Some(last) => self.kv.update(&record.id, value.clone(), last).await.map_err(|error| error.to_string()),
            None => self.kv.create(&record.id, value.clone()).await.map_err(|error| error.to_string()),
        };
        let written = match written {
            Ok(next) => Ok(next),
            // The record is not where this member left it. The server lost its store and
            // another coordinator made the bucket anew: this member leaves (`run`) rather
            // than write itself into a grid whose claims it does not know. Or this member
            // was paused past its lease and the record expired: it writes it again, but
            // only into the bucket it joined, seen to be the same; when that cannot be
            // told, the next heartbeat asks again.
            Err(first) => match self.bucket().await {
                Bucket::Same => {
                    warn!(member = %record.id, error = %first, "member record out of step; writing it again");
                    self.kv.put(&record.id, value).await.map_err(|error| error.to_string())
                }
                Bucket::Gone => Err(first),
                Bucket::Unknown => {
                    Err(format!("{first}; NATS cannot say now whether the members bucket is still the one joined: the next heartbeat asks again"))
                }
            },
        };
        match written {
            Ok(next) => {
                *revision = Some(next);
                self.lease.renewed(sent);
                Ok(())
            }
            Err(message) => Err(Error::Nats { what: "member heartbeat", source: message.into() }),
        }
    }

    /// Heartbeats until `stop`. A heartbeat that fails is logged and tried again at the
    /// next beat; the lease runs out on its own if none gets through.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let period = self.lease.duration() / HEARTBEATS_PER_LEASE;
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The term the lease held in after the last beat (`None`: it had run out). A lease
        // that ran out between two beats (the process was paused, or its tasks did not get
        // to run) comes back valid at the next one, but in a new term: lost all the same.
        let mut held = Some(self.lease.term());
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
                _ = self.beat_now.notified() => {}
            }
            // A write confirmed late still renews the lease (from when it was sent), and keeps
            // the revision the next beat updates: cut at one period, a slow server would see
            // every beat land while this member never renewed its lease.
            match tokio::time::timeout(self.lease.held_for().max(HEARTBEAT_WRITE_WAIT_MIN), self.beat()).await {
                Ok(Ok(())) => {}
                Ok(Err(failure)) if self.bucket().await == Bucket::Gone => {
                    error!(
                        error = %failure,
                        "the grid's members bucket is gone from NATS (its store was lost or deleted); leaving the grid \
                         to join it again"
                    );
                    self.lost.cancel();
                    return;
                }
                Ok(Err(error)) => warn!(error = %error, "member heartbeat failed"),
                Err(_) => warn!("member heartbeat timed out"),
            }
            let (valid, term) = (self.lease.valid(), self.lease.term());
            match held {
                Some(_) if !valid => {
                    ::metrics::counter!(metrics::LEASE_LOST).increment(1);
                    warn!("lease ran out before a heartbeat got through; shards stop here until it is renewed");
                }
                Some(before) if term != before => {
                    ::metrics::counter!(metrics::LEASE_LOST).increment(1);
                    warn!(
                        "lease ran out between two heartbeats (this process was paused or did not get to run); \
                         renewed again in a new term: its shards stopped here and are taken again as placement says"
                    );
                }
                None if valid => info!("lease renewed again"),
                _ => {}
            }
            held = valid.then_some(term);
        }
    }

    /// What NATS says of the members bucket this member joined: the same, gone (its stream
    /// is not found, or was made again since), or not known (it cannot be reached).
    async fn bucket(&self) -> Bucket {
        let read = self.jetstream.get_stream(&self.kv.stream_name).await;
        judge_bucket(
            read.as_ref().map(|bucket| bucket.cached_info().created.unix_timestamp_nanos()),
            self.bucket_created_ns,
        )
    }

    /// Cancelled once the grid's state in NATS is found gone ([`Membership::run`] stops).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Whether the shard manager is catching up (its bucket watches not running); a change
    /// is written at once by the heartbeat loop, without waiting here.
    pub fn set_catching_up(&self, catching_up: bool) {
        if self.catching_up.swap(catching_up, Ordering::AcqRel) != catching_up {
            self.beat_now.notify_one();
        }
    }

    /// Marks this member as leaving; the heartbeat loop tells the others at once, within
    /// its bounded wait. Writing the record here would hold it (and every heartbeat behind
    /// it) for as long as NATS takes to answer, and cost the lease on one slow answer.
    pub fn set_draining(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            self.beat_now.notify_one();
        }
    }

    /// Deletes the record: the others see the member gone at once.
    pub async fn leave(&self) {
        self.lease.revoke();
        let state = self.state.lock().await;
        if let Err(error) = self.kv.delete(&state.0.id).await {
            warn!(error = %error, "cannot delete the member record; it expires on its own");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error JetStream answers with `err_code`.
    fn answered(err_code: u64, description: &str) -> GetStreamError {
        let error =
            serde_json::from_value(serde_json::json!({"code": 404, "err_code": err_code, "description": description}))
                .expect("a JetStream error");
        GetStreamError::new(GetStreamErrorKind::JetStream(error))
    }

    #[test]
    fn a_record_is_written_again_only_into_the_bucket_seen_to_be_the_one_joined() {
        const JOINED: i128 = 1_700_000_000_000_000_000;
        assert_eq!(judge_bucket(Ok(JOINED), JOINED), Bucket::Same);
        assert_eq!(judge_bucket(Ok(JOINED + 1), JOINED), Bucket::Gone, "made anew since");
        let not_found = answered(ErrorCode::STREAM_NOT_FOUND.0, "stream not found");
        assert_eq!(judge_bucket(Err(&not_found), JOINED), Bucket::Gone);
        // Neither proves the bucket is the one joined: the record is not written.
        let timed_out = GetStreamError::with_source(GetStreamErrorKind::Request, "timed out");
        assert_eq!(judge_bucket(Err(&timed_out), JOINED), Bucket::Unknown);
        let no_leader = answered(10008, "JetStream cluster not available");
        assert_eq!(judge_bucket(Err(&no_leader), JOINED), Bucket::Unknown);
    }
}
