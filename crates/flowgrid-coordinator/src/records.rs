//! Records the coordinator persists in a shard's key space (see `flowgrid_store::keys`),
//! encoded as MessagePack.
//!
//! A run is persisted as its *history*: record 0 is the [`StartRecord`], every later
//! record an accepted engine event with the time it was applied. Replaying the history
//! through the engine rebuilds the run exactly; timers and open attempts are part of the
//! rebuilt state, so nothing else needs storing while the run is active.

use std::borrow::Cow;

use flowgrid_engine::{Event, RunStatus};
use flowgrid_model::{FlowDefinition, Labels, Millis, ParentRef, RunId};
use flowgrid_proto::{ChildRunEnded, GateMessage, RunEnded};
use flowgrid_store::keys;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// History record 0 of a run. Borrowed where it is written (the run keeps its input),
/// owned where it is read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StartRecord<'a> {
    pub flow: Cow<'a, str>,
    pub version: u32,
    pub input: Cow<'a, Value>,
    pub now_ms: Millis,
    /// The shard's epoch the record was committed under (audits check that it never
    /// goes down along a run's history).
    #[serde(default)]
    pub epoch: u64,
    /// The subflow step that started the run, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Cow<'a, ParentRef>>,
    /// The labels it was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Cow<'a, Labels>>,
    /// It started queued: its flow's concurrency limit admits it later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
    /// It starts no step before this time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_ms: Option<Millis>,
}

/// History records 1..: one accepted event each.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    pub now_ms: Millis,
    pub event: Event,
    /// The shard's epoch the record was committed under.
    #[serde(default)]
    pub epoch: u64,
}

/// A run's place under a concurrency limit, kept by the limit's shard (`keys::gate`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GateRecord {
    /// The run's round (see [`GateMessage::round`]).
    pub round: u32,
    /// It holds a slot (`true`), or waits in the queue.
    pub admitted: bool,
    /// When it asked (waiting) or was admitted (holding), by the gate's clock: the order
    /// `cancel_oldest` turns holders away in, and the queue's order among places written
    /// without `seq`.
    pub since_ms: Millis,
    /// Where it waits in the queue: the gate numbers the places it queues in the order
    /// asked, so a reload queues them in that order even when many asked within one
    /// millisecond or the gate's clock went back. `None`: a holder, or a place written
    /// before places were numbered (queued before any numbered one: they go first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The limit's `max` as the gate held it when it wrote this record (0: no bound on
    /// runs at once).
    pub max: u32,
    /// The limit's start rate as the gate held it when it wrote this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<flowgrid_model::StartRate>,
    /// What a run past the limit does, as the gate held it when it wrote this record.
    #[serde(default, skip_serializing_if = "flowgrid_model::WhenFull::is_queue")]
    pub when_full: flowgrid_model::WhenFull,
    /// The flow version those bounds are of (see [`GateMessage::version`]): a reload takes
    /// the bounds of the record with the newest version. 0: written before versions were
    /// kept.
    #[serde(default, skip_serializing_if = "flowgrid_model::is_zero")]
    pub version: u32,
    /// A holder that `cancel_oldest` turned away: it is being cancelled and keeps its slot
    /// until its release comes, but no longer counts against `max`, so a reload does not
    /// turn it away a second time. `false` in records written before it was kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelling: bool,
}

/// The `gate_rate` key: where a limit's start rate stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GateRateRecord {
    /// When the rate's bucket is full again, in Unix microseconds: every start admitted
    /// moves it on by the rate's interval (from now, if it had passed).
    pub full_us: u64,
}

/// The `run` key: what a run is, and its status as of its last commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub flow: String,
    pub version: u32,
    pub status: RunStatus,
    pub created_ms: Millis,
    #[serde(default)]
    pub ended_ms: Option<Millis>,
    /// The run's final view was too large to keep as a snapshot in the commit that ended
    /// it: reads rebuild it from the run's history.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub view_in_history: bool,
}

/// The `catalog` key: one deployed version of a flow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CatalogRecord {
    pub deployed_ms: Millis,
    pub definition: FlowDefinition,
}

/// The `outbox` key: a message for another run's shard (or the run-ends stream), written
/// in the commit that decided it and deleted once its receiver took it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxRecord {
    /// A child run ended: its parent's subflow step is to take the end.
    ChildEnded(ChildRunEnded),
    /// A run is to be cancelled: the child of a parent that ended while it went on, or a
    /// run a concurrency limit turns away (`when_full`). The name stays as stored.
    CancelChild { child: RunId, reason: String },
    /// A run of a flow with `publish_ended` ended: announce it on the run-ends stream.
    RunEnded(RunEnded),
    /// A run queued for its flow's concurrency limit asks the limit's shard for a slot.
    GateAcquire(GateMessage),
    /// A run of a flow with a concurrency limit ended: its slot goes back to the limit.
    GateRelease(GateMessage),
    /// The limit admits a queued run: its shard is to start the steps it holds.
    Admit(GateMessage),
    /// A run ended as its flow's `on_failure` names: start the handler flow's run (with an
    /// idempotency key, so a repeat starts nothing new).
    StartFailureHandler { failed: RunId, round: u32, start: flowgrid_proto::StartRun },
}

impl OutboxRecord {
    /// The kind of message: the last element of its outbox key, and its name in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            OutboxRecord::ChildEnded(_) => OUTBOX_CHILD_ENDED,
            OutboxRecord::CancelChild { .. } => OUTBOX_CANCEL_CHILD,
            OutboxRecord::RunEnded(_) => OUTBOX_RUN_ENDED,
            OutboxRecord::GateAcquire(_) => OUTBOX_GATE_ACQUIRE,
            OutboxRecord::GateRelease(_) => OUTBOX_GATE_RELEASE,
            OutboxRecord::Admit(_) => OUTBOX_ADMIT,
            OutboxRecord::StartFailureHandler { .. } => OUTBOX_ON_FAILURE,
        }
    }

    /// Its key in the outbox: one message of each kind per run (the child, or the run
    /// that ended), and per round of the run for the concurrency limit's messages (a
    /// redriven run's messages do not replace those of its earlier round).
    pub fn key(&self) -> Vec<u8> {
        let run_id = match self {
            OutboxRecord::ChildEnded(ended) => &ended.child,
            OutboxRecord::CancelChild { child, .. } => child,
            OutboxRecord::RunEnded(ended) => &ended.run_id,
            OutboxRecord::GateAcquire(message) | OutboxRecord::GateRelease(message) | OutboxRecord::Admit(message) => {
                return keys::outbox(&message.run_id, &format!("{}.{}", self.kind(), message.round));
            }
            OutboxRecord::StartFailureHandler { failed, round, .. } => {
                return keys::outbox(failed, &format!("{}.{round}", self.kind()));
            }
        };
        keys::outbox(run_id, self.kind())
    }
}

/// The last element of an outbox key, by kind of message (also the kind's name in metrics).
pub const OUTBOX_CHILD_ENDED: &str = "child_ended";
pub const OUTBOX_CANCEL_CHILD: &str = "cancel_child";
pub const OUTBOX_RUN_ENDED: &str = "run_ended";
pub const OUTBOX_GATE_ACQUIRE: &str = "gate_acquire";
pub const OUTBOX_GATE_RELEASE: &str = "gate_release";
pub const OUTBOX_ADMIT: &str = "admit";
pub const OUTBOX_ON_FAILURE: &str = "on_failure";
/// Every kind of message in the outbox.
pub const OUTBOX_KINDS: [&str; 7] = [
    OUTBOX_CHILD_ENDED,
    OUTBOX_CANCEL_CHILD,
    OUTBOX_RUN_ENDED,
    OUTBOX_GATE_ACQUIRE,
    OUTBOX_GATE_RELEASE,
    OUTBOX_ADMIT,
    OUTBOX_ON_FAILURE,
];

/// The kind of the message at outbox key `key`, for metrics and logs.
pub fn outbox_kind(key: &[u8]) -> &'static str {
    let Ok((_, what)) = keys::decode_outbox(key) else { return "unknown" };
    // A concurrency limit's message carries its round after a dot.
    let kind = what.split('.').next();
    OUTBOX_KINDS.into_iter().find(|known| kind == Some(*known)).unwrap_or("unknown")
}

/// Bytes reserved up front for an encoded record: most records fit, so encoding them
/// does not grow the buffer step by step.
const RECORD_BYTES_HINT: usize = 256;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(RECORD_BYTES_HINT);
    // Records are plain data types; encoding them cannot fail.
    rmp_serde::encode::write_named(&mut bytes, value).expect("records encode to MessagePack");
    bytes
}

pub fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|error| Error::Corrupt { what: what.to_owned(), message: error.to_string() })
}

#[cfg(test)]
mod tests {
    use flowgrid_model::RunId;
    use flowgrid_store::keys;

    use super::{outbox_kind, OUTBOX_GATE_RELEASE, OUTBOX_KINDS, OUTBOX_RUN_ENDED};

    #[test]
    fn an_outbox_key_names_its_kind_with_or_without_a_round() {
        let run = RunId("r".into());
        for kind in OUTBOX_KINDS {
            assert_eq!(outbox_kind(&keys::outbox(&run, kind)), kind);
        }
        assert_eq!(outbox_kind(&keys::outbox(&run, &format!("{OUTBOX_GATE_RELEASE}.3"))), OUTBOX_GATE_RELEASE);
        assert_eq!(outbox_kind(&keys::outbox(&run, "something_else")), "unknown");
        assert_eq!(outbox_kind(b"not a key"), "unknown");
        assert_ne!(outbox_kind(&keys::outbox(&run, &format!("{OUTBOX_RUN_ENDED}x"))), OUTBOX_RUN_ENDED);
    }
}
