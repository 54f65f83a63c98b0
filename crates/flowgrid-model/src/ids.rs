//! Identifiers shared by every crate. Anything persisted or on the wire uses these
//! newtypes and fixed-width integers.

use std::fmt;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch. Time is always an input to the core.
pub type Millis = u64;

/// The id of one run: a UUID in text form.
// Shared, not copied: a run's id sits in its table entry, its state, its timers and
// every attempt id, and a clone only bumps a count.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct RunId(pub Arc<str>);

impl RunId {
    /// A fresh, time-ordered run id (UUID v7) from a caller-supplied timestamp and random bits.
    pub fn from_parts(now: Millis, random: u128) -> Self {
        let bytes = ((u128::from(now) & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
        let mut uuid = uuid::Builder::from_u128(bytes);
        uuid.set_version(uuid::Version::SortRand).set_variant(uuid::Variant::RFC4122);
        RunId(uuid.into_uuid().to_string().into())
    }

    /// The run id an idempotency key maps to: the same flow and key always give the same
    /// run, which is what makes a repeated start return the existing run.
    pub fn from_idempotency_key(flow: &str, key: &str) -> Self {
        let name = format!("{flow}\u{0}{key}");
        RunId(uuid::Uuid::new_v5(&RUN_ID_NAMESPACE, name.as_bytes()).to_string().into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The run and step a child run reports its end to (set on runs a `subflow` step starts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ParentRef {
    pub run_id: RunId,
    pub step: String,
    /// The item of a subflow step with `items`; absent for a step with one child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// 1 for the child of a run nobody started as a child, one more per level below.
    pub depth: u32,
    /// Which start of the step this child belongs to: 0 for the first, more once the
    /// parent was redriven and the step ran again (each round gets children of its own).
    #[serde(default, skip_serializing_if = "crate::is_zero")]
    pub round: u32,
}

impl ParentRef {
    /// The idempotency key the child run of step `step` (item `item`, round `round`) of
    /// run `parent` is started with: the child's run id follows from it (see
    /// [`ParentRef::child_run_id`]), so starting it again starts nothing new.
    pub fn child_key(parent: &RunId, step: &str, item: Option<u32>, round: u32) -> String {
        let mut key = match item {
            Some(item) => format!("subflow/{parent}/{step}/{item}"),
            None => format!("subflow/{parent}/{step}"),
        };
        if round > 0 {
            // Items are numbers, so `r<n>` cannot be mistaken for one.
            key.push_str(&format!("/r{round}"));
        }
        key
    }

    /// The run id of the child run of flow `flow` that step `step` (item `item`, round
    /// `round`) of run `parent` starts.
    pub fn child_run_id(flow: &str, parent: &RunId, step: &str, item: Option<u32>, round: u32) -> RunId {
        RunId::from_idempotency_key(flow, &ParentRef::child_key(parent, step, item, round))
    }
}

/// Namespace for idempotency-derived run ids (fixed forever: changing it would change ids).
const RUN_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1e_2d8a_4c4b_4f1f_9a3e_5b7c_2d10_a9e4);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A virtual shard: `shard_of(run) = xxh3(run id) % shards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Virtual shards of a grid created without `--shards`. Each shard costs its owner a store
/// file, a checkpoint per second and a commit per batch, so a few per coordinator core do
/// best; 64 still spreads a grid over up to 64 coordinators (ADR 0007).
pub const SHARDS_DEFAULT: u32 = 64;

/// The shard a key (a run id, or a flow name for the catalog) belongs to. The hash is
/// fixed forever: changing it would move every persisted run.
pub fn shard_of(key: &str, shards: u32) -> ShardId {
    assert!(shards > 0, "shard count must be positive");
    ShardId((xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % u64::from(shards)) as u32)
}

/// Ownership generation of a shard. Acquiring a shard bumps it in the store; every
/// commit checks it, so a stale owner cannot write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One attempt of one task: the unit of exactly-once result application. A result is
/// applied only if it names the attempt that is currently open.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub struct AttemptId {
    pub run_id: RunId,
    /// Step id inside the flow definition.
    pub step: String,
    /// Item index for `map` steps; absent for `task` steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// 1-based attempt number.
    pub attempt: u32,
}

impl AttemptId {
    /// The JetStream message id of this attempt's task (`Nats-Msg-Id`), so that the broker
    /// drops a republished duplicate inside its de-duplication window.
    pub fn message_id(&self) -> String {
        use std::fmt::Write;
        // Sized once: three separators and two `u32`s take at most 23 bytes.
        let mut id = String::with_capacity(self.run_id.as_str().len() + self.step.len() + 23);
        // Writing to a `String` cannot fail.
        let _ = match self.item {
            Some(item) => write!(id, "{}:{}:{}:{}", self.run_id, self.step, item, self.attempt),
            None => write!(id, "{}:{}::{}", self.run_id, self.step, self.attempt),
        };
        id
    }
}

impl fmt::Display for AttemptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_key_gives_a_stable_run_id() {
        let first = RunId::from_idempotency_key("flow", "key-1");
        assert_eq!(first, RunId::from_idempotency_key("flow", "key-1"));
        assert_ne!(first, RunId::from_idempotency_key("flow", "key-2"));
        assert_ne!(first, RunId::from_idempotency_key("other", "key-1"));
    }

    #[test]
    fn shard_of_is_in_range_and_stable() {
        for shards in [1, 7, 256] {
            let shard = shard_of("run-a", shards);
            assert!(shard.0 < shards);
            assert_eq!(shard, shard_of("run-a", shards));
        }
    }

    #[test]
    fn time_ordered_run_ids_sort_by_time() {
        let early = RunId::from_parts(1_000, u128::MAX);
        let late = RunId::from_parts(2_000, 0);
        assert!(early < late);
    }
}
