//! FoundationDB's limits, enforced by every backend.

/// FoundationDB's hard limit on a key, prefix included.
pub const FDB_KEY_BYTES_MAX: usize = 10_000;
/// FoundationDB's hard limit on a value.
pub const FDB_VALUE_BYTES_MAX: usize = 100_000;
/// FoundationDB's limit on a transaction, as its client counts it (keys with their prefix,
/// values, conflict ranges: [`crate::WriteBatch::commit_bytes`]).
pub const FDB_TRANSACTION_BYTES_MAX: usize = 10_000_000;

/// Limits every transaction is checked against before it commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// FoundationDB refuses keys over 10,000 bytes, counting the backend's prefix (cluster
    /// root and shard); the default keeps 1,000 bytes of those for the prefix.
    pub key_bytes_max: usize,
    /// FoundationDB refuses values over 100,000 bytes; larger records are chunked.
    pub value_bytes_max: usize,
    /// FoundationDB refuses transactions over 10,000,000 bytes, counting conflict ranges
    /// ([`crate::WriteBatch::bytes`] does) and a backend's key prefixes; the default keeps
    /// 1,000,000 bytes for those. Every backend also checks a batch's size with
    /// `key_prefix_bytes_max` before each key against FoundationDB's limit.
    pub transaction_bytes_max: usize,
    /// The longest prefix a backend puts before every key (the FoundationDB backend's root
    /// and shard, tuple-encoded; it refuses a longer root). Every backend counts it for each
    /// key of a batch, so that a batch that commits in one commits in all.
    pub key_prefix_bytes_max: usize,
    /// FoundationDB aborts transactions older than 5 s.
    pub transaction_ms_max: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            key_bytes_max: 9_000,
            value_bytes_max: 100_000,
            transaction_bytes_max: 9_000_000,
            key_prefix_bytes_max: 64,
            transaction_ms_max: 5_000,
        }
    }
}
