//! What coordinators publish about themselves and their shards, in two NATS KV buckets
//! (see [`Subjects::members_bucket`](crate::Subjects::members_bucket) and
//! [`Subjects::shards_bucket`](crate::Subjects::shards_bucket)).
//!
//! - Members bucket, key = member id: a [`MemberRecord`] the member rewrites every
//!   heartbeat with compare-and-set on its last revision. A member whose record has not
//!   changed for its `lease_ms` is dead to everyone else, and its shards may be taken.
//! - Shards bucket, key [`shard_key`]: a [`ShardClaim`] per shard, changed only with
//!   compare-and-set, so that two coordinators can never both claim a shard; key
//!   [`GRID_KEY`]: the [`GridConfig`] every coordinator of the grid must agree with, and
//!   next to its fields the `prefix` the grid was made with (absent in records of earlier
//!   versions): a prefix that names the same buckets (they fold case, `.`, `-` and `_`)
//!   but differs is another grid's, and its coordinators are refused.
//!
//! A third bucket (see [`Subjects::workers_bucket`](crate::Subjects::workers_bucket)) holds
//! a [`WorkerRecord`] per live worker, rewritten every few seconds: what `flowgrid workers`
//! lists.
//!
//! Records are MessagePack, like every other message of the grid.

use flowgrid_model::Millis;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Key of the [`GridConfig`] in the shards bucket.
pub const GRID_KEY: &str = "grid";

/// Key of shard `shard`'s claim in the shards bucket: `shard-17`.
pub fn shard_key(shard: u32) -> String {
    format!("shard-{shard}")
}

/// The shard a key of the shards bucket names, if it names one.
pub fn shard_of_key(key: &str) -> Option<u32> {
    key.strip_prefix("shard-")?.parse().ok()
}

/// A worker serving one pool, as it describes itself in the workers bucket (key: its
/// `id`). Workers rewrite it every [`WorkerRecord::HEARTBEAT_MS`]; the bucket drops a
/// record not rewritten for [`WorkerRecord::KEPT_MS`], so a worker that died disappears.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerRecord {
    /// Unique per worker start: `<pool>.<host>-<pid>-<4 hex digits>` (a KV key).
    pub id: String,
    pub pool: String,
    pub host: String,
    pub pid: u32,
    /// Tasks it runs at once, at most.
    pub concurrency: u32,
    /// Tasks running now.
    pub running: u32,
    /// Tasks it finished (a result, an error or a cancel settled) since it started.
    pub tasks_done: u64,
    pub started_ms: Millis,
    /// Wall-clock time of this heartbeat.
    pub heartbeat_ms: Millis,
    /// What the worker is built with, e.g. `flowgrid-sdk 0.1.0` or `python nats-py`.
    pub sdk: String,
}

impl WorkerRecord {
    /// How often a worker rewrites its record.
    pub const HEARTBEAT_MS: u64 = 5_000;
    /// How long the bucket keeps a record not rewritten.
    pub const KEPT_MS: u64 = 30_000;
}

/// A live coordinator, as it describes itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MemberRecord {
    /// Unique per process start: a restarted coordinator is a new member.
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub started_ms: Millis,
    /// Wall-clock time of this heartbeat (for display; liveness is judged by revisions).
    pub heartbeat_ms: Millis,
    /// How long the member may go without a heartbeat before others take its shards.
    pub lease_ms: u64,
    /// A draining member is leaving: it gives its shards away and takes none.
    pub draining: bool,
    /// A member catching up (starting, or back after losing NATS) is not watching the
    /// buckets yet, so it could not take a shard handed to it: the others place none on it
    /// until it says it is done. Absent in records of earlier versions: not catching up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catching_up: bool,
    /// Shards this member serves right now.
    pub shards_serving: u32,
    /// Where the member keeps shard state, e.g. `redb:<host>:<data dir>`; every member of
    /// a grid on the embedded store must name the same one.
    pub store: String,
    /// The member's Prometheus endpoint, if it serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// Where a shard is in its hand-over cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShardState {
    /// Claimed by `owner`, which is opening and reloading it.
    Acquiring,
    /// `owner` serves it: commands, results and timers are handled.
    Serving,
    /// `owner` stopped taking work for it and is committing what it holds.
    Releasing,
    /// Nobody holds it; the next owner may claim it at once.
    Released,
}

/// Who holds a shard. Changed only by compare-and-set on the key's revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ShardClaim {
    /// The member holding the shard, none once released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub state: ShardState,
    /// The shard's epoch in the store as of the owner's acquire (0 before the first).
    pub epoch: u64,
    /// Wall-clock time of the last change.
    pub changed_ms: Millis,
}

/// Settings every coordinator of a grid must share; written by the first one. The record
/// also holds the grid's `prefix` (see the module's notes), which a reader of the settings
/// passes over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GridConfig {
    pub shards: u32,
    pub created_ms: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_keys_round_trip() {
        assert_eq!(shard_key(17), "shard-17");
        assert_eq!(shard_of_key("shard-17"), Some(17));
        assert_eq!(shard_of_key(GRID_KEY), None);
        assert_eq!(shard_of_key("shard-x"), None);
    }
}
